"""The per-tower FLOPs model against an independent count: torch's FlopCounterMode running the real tiny Puffin.

FlopCounterMode counts every matmul / convolution the forward pass dispatches, attributed to the module that ran
it. SDPA runs with the math backend so that its score and value products are plain (counted) ``bmm``s; the CPU
flash kernel has no FLOP formula in torch. The VAE is not a submodule of ``PuffinModel``: its count is the
global total minus the model's towers.

Tolerance: with ``as_executed=True`` the model must equal the counter exactly (both are exact integer sums; rel
1e-12 only absorbs float rounding). The default model FLOPs differ systematically by the padding and causal
masking the local implementation computes anyway: the LLM's linear layers scale exactly by real / padded
tokens, and its dense ``S x S`` scores include the masked upper triangle and the left pads.
"""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import megatron_puffin.distributed as mpd
from helpers.puffin import TASK_STREAMS, make_tiny_dataset, task_batches, tiny_puffin_config
from megatron_puffin.training.objectives import puffin_loss
from megatron_puffin.training.flops import matmul_flops, measure_matmul_tflops, supervised_positions
from megatron_puffin.training.towers import TOWER_NAMES as TOWERS
from megatron_puffin.training.towers import TOWERS as TOWER_SPECS
from megatron_puffin.training.towers import forward_flops, micro_batch_flops, trainable_towers

# tower -> FlopCounterMode module names (the registry's module paths; the VAE is not a submodule)
MODULES = {spec.name: [f"PuffinModel.{spec.module}"] for spec in TOWER_SPECS if spec.module}
# The output layer runs from the model's last stage on the supervised rows, outside the LLM's forward.
MODULES["llm"].append("PuffinModel.llm.output_layer")
LINEAR_OPS, ATTENTION_OPS = ("aten.mm", "aten.addmm"), ("aten.bmm", "aten.baddbmm")
EXACT = dict(rel=1e-12, abs=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from megatron_puffin.models.puffin import build_puffin

    paths = make_tiny_dataset(tmp_path_factory.mktemp("flops"))
    mpd.initialize(seed=0)
    config = tiny_puffin_config(paths)
    torch.manual_seed(0)
    yield config, build_puffin(config, pg_collection=mpd.process_groups()).train(), task_batches(paths)
    mpd.destroy()


def counted(model, batch):
    """{tower: {"linear", "attention", "total"}} from FlopCounterMode over one forward."""
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        puffin_loss(model, batch)
    counts = {name: {str(op): value for op, value in ops.items()} for name, ops in counter.get_flop_counts().items()}

    def total(names, ops=None):
        return sum(v for n in names for op, v in counts.get(n, {}).items() if ops is None or op in ops)

    result = {
        tower: {"linear": total(names, LINEAR_OPS), "attention": total(names, ATTENTION_OPS), "total": total(names)}
        for tower, names in MODULES.items()
    }
    result["vae"] = {"total": total(["Global"]) - sum(r["total"] for r in result.values())}
    return result


def mixed_size_image2image(batch):
    """The image2image batch with a second target (and its camera map) 64 px high and a 64 px wide initial
    view: the DiT's image streams differ in length and are right-padded."""
    mixed = dict(batch)
    mixed["target_images"] = [batch["target_images"][0], batch["target_images"][1][:, :64]]
    mixed["camera_maps"] = [batch["camera_maps"][0], batch["camera_maps"][1][:, :64]]
    mixed["init_images"] = [batch["init_images"][0][:, :, :64], batch["init_images"][1]]
    return mixed


@pytest.mark.parametrize("task", list(TASK_STREAMS))
def test_executed_flops_equal_flop_counter_for_every_tower(tiny, task):
    config, model, batches = tiny
    batch = batches[task][0]
    measured = counted(model, batch)
    ours = forward_flops(config, batch, as_executed=True)
    for tower in ("llm", "dit", "queries", "vision", "projector"):
        assert ours[tower].linear == pytest.approx(measured[tower]["linear"], **EXACT), tower
        assert ours[tower].attention == pytest.approx(measured[tower]["attention"], **EXACT), tower
    for tower in TOWERS:
        assert ours[tower].total == pytest.approx(measured[tower]["total"], **EXACT), tower
    ran = {tower for tower in TOWERS if measured[tower]["total"]}
    assert ran == {tower for tower in TOWERS if ours[tower].total}
    assert "llm" in ran and ("dit" in ran) == (task in ("text2image", "cam2image", "image2image"))


@pytest.mark.parametrize("task", list(TASK_STREAMS))
def test_model_flops_leave_out_padding_and_the_causal_upper_triangle(tiny, task):
    config, model, batches = tiny
    batch = batches[task][0]
    measured = counted(model, batch)
    ours = forward_flops(config, batch)
    mask = batch["attention_mask"]
    real, padded = int(mask.sum()), mask.numel()
    # The output layer runs on the supervised positions only, at the real (model) or padded (executed) vocabulary.
    llm, rows = config.llm, supervised_positions(batch)
    head = {vocab: matmul_flops(rows, vocab, llm.hidden_size) for vocab in (llm.vocab_size, llm.padded_vocab_size(1))}
    assert rows > 0 or task in ("text2image", "cam2image", "image2image")
    assert ours["llm"].linear - head[llm.vocab_size] == pytest.approx(
        (measured["llm"]["linear"] - head[llm.padded_vocab_size(1)]) * real / padded, **EXACT)
    pairs = sum(n * (n + 1) / 2 for n in mask.sum(dim=1).tolist())
    dense = mask.shape[0] * mask.shape[1] ** 2
    assert ours["llm"].attention == pytest.approx(measured["llm"]["attention"] * pairs / dense, **EXACT)
    for tower in ("vision", "projector", "queries", "dit", "vae"):  # unpadded here: model FLOPs = executed
        assert ours[tower].total == pytest.approx(measured[tower]["total"], **EXACT), tower


def test_padded_dit_stream_is_counted_as_executed_and_excluded_from_model_flops(tiny):
    config, model, batches = tiny
    batch = mixed_size_image2image(batches["image2image"][0])
    measured = counted(model, batch)
    executed, real = forward_flops(config, batch, as_executed=True), forward_flops(config, batch)
    for tower in TOWERS:
        assert executed[tower].total == pytest.approx(measured[tower]["total"], **EXACT), tower
    assert real["dit"].total < executed["dit"].total
    assert real["dit"].conv == executed["dit"].conv  # the patchifier only sees real latents
    assert real["vae"].total == executed["vae"].total < counted(model, batches["image2image"][0])["vae"]["total"]


@pytest.mark.parametrize("tower, flag", [("llm", "freeze_llm"), ("vision", "freeze_vision"), ("dit", "freeze_dit")])
def test_freezing_a_tower_removes_two_thirds_of_its_trainable_count(tiny, tower, flag):
    config, _, batches = tiny
    batch = batches["image2image"][0]  # runs every tower
    trainable = trainable_towers(config.model)
    assert trainable == {"llm": True, "vision": True, "projector": True, "queries": True, "dit": True, "vae": False}
    frozen = dict(trainable, **{tower: False})
    full, reduced = micro_batch_flops(config, batch, trainable), micro_batch_flops(config, batch, frozen)
    assert full[tower] > 0
    assert full["total"] - reduced["total"] == pytest.approx(2 / 3 * full[tower], rel=1e-12)
    assert reduced[tower] == pytest.approx(full[tower] / 3, rel=1e-12)
    forward = forward_flops(config, batch)
    assert full["vae"] == forward["vae"].total  # the VAE is always frozen: forward only
    assert full["total"] == pytest.approx(sum(full[t] for t in TOWERS), rel=1e-12)


def test_trainable_map_must_name_every_tower(tiny):
    config, _, batches = tiny
    with pytest.raises(ValueError, match=r"missing \['vae'\].*trainable_towers"):
        micro_batch_flops(config, batches["text2text"][0], {t: True for t in TOWERS if t != "vae"})


def test_measured_matmul_rate_is_positive():
    rate = measure_matmul_tflops(size=128, seconds=0.05)
    assert 0 < rate < 1e4


def test_matmul_rate_is_timed_with_the_given_clock():
    """bench_training.py --clock cpu: the rate over process CPU seconds; a clock that advances 1 s per reading
    ends the loop after one product and gives exactly that product's FLOPs per second."""
    ticks = iter(range(1000))
    rate = measure_matmul_tflops(size=64, seconds=0.5, clock=lambda: float(next(ticks)))
    assert rate == pytest.approx(2 * 64 ** 3 / 1e12)
