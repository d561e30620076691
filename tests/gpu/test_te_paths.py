"""The Transformer Engine and FP8 paths on a GPU (skipped without CUDA; the TE cases without a usable TE).

NOT RUN YET: no machine lent so far had Transformer Engine (see docs/gpu.md). Written against megatron-core 0.16.1
and Transformer Engine's code; the CPU suite covers what does not need TE (layouts, masks, spec contents, extra-state
key handling, FP8 padding and validation).

(a) Checkpoint round trips across implementations through real distributed checkpoints: local -> TE, TE -> TE,
    TE -> local give back exactly the saved weights (TE's ``_extra_state`` is the only difference allowed).
(b) TE vs local numbers on padded, mixed-size micro-batches, all six tasks through the composed tiny model (so all
    four towers: right-padded LLM rows of different lengths, the ViT, the connectors, and MMDiT streams of mixed
    latent sizes), bf16: every task's loss within ``BF16_REL_LOSS``; the ViT alone with its tokens key-padded as
    for FP8 (TE's ``padding`` mask); the connectors alone (the LLM and the MMDiT have their own files).
(c) pretrain_puffin.py with --transformer-impl transformer_engine and with --fp8-format hybrid (LLM and ViT): 4 steps, save at
    2, resume from 2: the resumed losses equal the uninterrupted run's (1e-3 relative, bf16 on one GPU).
(d) With two GPUs: a TP=2 run through torchrun (NCCL) gives the one-GPU losses within bf16 tolerance (local spec,
    and TE when usable).
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers.puffin import (
    ROOT,
    TASK_STREAMS,
    make_tiny_dataset,
    mixed_size_batch,
    task_batches,
    tiny_puffin_config,
)
from megatron_puffin.optional_deps import transformer_engine_error
from megatron_puffin.training.objectives import puffin_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TE_REASON = transformer_engine_error() if torch.cuda.is_available() else "needs a CUDA device"
needs_te = pytest.mark.skipif(TE_REASON is not None, reason=f"Transformer Engine unusable: {TE_REASON}")
TINY = ROOT / "examples" / "tiny"
BF16_REL_LOSS = 2e-2
RESUME_REL = 1e-3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_dataset(tmp_path_factory.mktemp("te"), num_samples=16)


@pytest.fixture(scope="module")
def gpu_world():
    import megatron_puffin.distributed as mpd

    ctx = mpd.initialize(seed=0)
    yield ctx
    mpd.destroy()


def _model(paths, impl: str):
    from megatron_puffin.distributed import process_groups
    from megatron_puffin.models.puffin import build_puffin
    from megatron_puffin.training.towers import freeze_towers

    torch.manual_seed(0)
    config = dataclasses.replace(tiny_puffin_config(paths, freeze_vision=True), params_dtype=torch.bfloat16,
                                 transformer_impl=impl)
    model = build_puffin(config, pg_collection=process_groups())
    freeze_towers(model, config.model)
    return model.cuda().eval()


def _weights(model):
    from megatron_puffin.models.extra_state import is_extra_state_key

    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()
            if torch.is_tensor(v) and not is_extra_state_key(k)}


@needs_te
def test_checkpoints_round_trip_across_implementations(data, gpu_world, tmp_path):
    from megatron_puffin.checkpointing import load_model_checkpoint, save_checkpoint

    local = _model(data, "local")
    save_checkpoint(local.sharded_state_dict(), str(tmp_path / "local"))
    te = _model(data, "transformer_engine")
    load_model_checkpoint(te, str(tmp_path / "local"))  # local -> TE (no _extra_state in the checkpoint)
    save_checkpoint(te.sharded_state_dict(), str(tmp_path / "te"))
    te_again = _model(data, "transformer_engine")
    load_model_checkpoint(te_again, str(tmp_path / "te"))  # TE -> TE
    back = _model(data, "local")
    with torch.no_grad():
        for param in back.parameters():
            param.zero_()
    load_model_checkpoint(back, str(tmp_path / "te"))  # TE -> local
    for key, value in _weights(local).items():
        assert torch.equal(_weights(back)[key], value), key
    te_weights, te_again_weights = _weights(te), _weights(te_again)
    assert te_weights.keys() == te_again_weights.keys()
    for key, value in te_weights.items():
        assert torch.equal(te_again_weights[key], value), key


@needs_te
def test_te_matches_local_on_padded_mixed_size_micro_batches(data, gpu_world, tmp_path):
    from megatron_puffin.checkpointing import load_model_checkpoint, save_checkpoint

    local = _model(data, "local")
    save_checkpoint(local.sharded_state_dict(), str(tmp_path / "weights"))
    te = _model(data, "transformer_engine")
    load_model_checkpoint(te, str(tmp_path / "weights"))
    batches = task_batches(data, micro_batch_size=3)
    cases = {task: batches[task][0] for task in TASK_STREAMS}
    cases.update({f"{task}_mixed": mixed_size_batch(batches[task][0]) for task in ("text2image", "cam2image", "image2image")})
    for name, batch in cases.items():
        assert not bool(batch["attention_mask"].all()), f"{name}: the LLM rows should be padded"
        with torch.no_grad():
            expected, got = float(puffin_loss(local, batch).loss), float(puffin_loss(te, batch).loss)
        assert abs(got - expected) <= BF16_REL_LOSS * abs(expected), (name, got, expected)


def _local_and_te(build, what: str) -> dict:
    """``build(impl)`` for the local and the Transformer Engine spec from the same seed (eval mode, bf16), the TE
    tower loaded with the local tower's weights (TE's ``_extra_state`` entries created as TE expects)."""
    from megatron_puffin.models.extra_state import load_model_state

    towers = {}
    for impl in ("local", "transformer_engine"):
        torch.manual_seed(0)
        towers[impl] = build(impl).eval()
    load_model_state(towers["transformer_engine"], towers["local"].state_dict(), what)
    return towers


@needs_te
def test_te_vision_tower_with_key_padded_tokens_matches_unpadded(gpu_world):
    """The ViT's tokens padded as for FP8 (3 images x 38 tokens -> 3 x 48, pads key-masked at the end of each image):
    Transformer Engine's ``padding`` attention reads megatron-core's mask as meant, the outputs equal the unpadded
    TE run's and the local spec's (bf16, ``BF16_REL_LOSS`` of the largest value)."""
    from megatron_puffin.distributed import process_groups
    from megatron_puffin.models.vision import VisionConfig, build_vision

    config = VisionConfig(hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=128,
                          max_image_size=96, class_token_len=2)
    towers = _local_and_te(lambda impl: build_vision(config, 64, transformer_impl=impl, params_dtype=torch.bfloat16,
                                                     pg_collection=process_groups()), "the local vision tower")
    images = torch.rand(3, 3, 96, 96, device="cuda", generator=torch.Generator("cuda").manual_seed(1)) * 2 - 1
    outputs = {}
    for impl, multiple in (("local", 1), ("transformer_engine", 1), ("transformer_engine", 16)):
        towers[impl].row_multiple = multiple
        with torch.no_grad():
            outputs[impl, multiple] = towers[impl](images).float()
    expected = outputs["local", 1]
    for key in (("transformer_engine", 1), ("transformer_engine", 16)):
        error = (outputs[key] - expected).abs().max().item()
        assert error <= BF16_REL_LOSS * expected.abs().max().item(), (key, error)


@needs_te
def test_te_connectors_match_local(gpu_world):
    """Both connector encoders (the towers between the LLM's queries and the MMDiT) under the TE spec against the
    local spec on the same weights, 3 samples x 16 queries: bf16, within ``BF16_REL_LOSS`` of the largest value (the
    zero-initialised projectors are left out: they would make the comparison trivial)."""
    from megatron_puffin.distributed import process_groups
    from megatron_puffin.models.connector import ConnectorConfig, build_query_conditioner

    config = ConnectorConfig(num_queries=16, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=128,
                             pooled_projection_dim=32, joint_attention_dim=48)
    built = _local_and_te(lambda impl: build_query_conditioner(config, 64, transformer_impl=impl,
                                                               params_dtype=torch.bfloat16,
                                                               pg_collection=process_groups()), "the local connectors")
    states = torch.randn(3, 16, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).bfloat16()
    for branch in ("1", "2"):
        with torch.no_grad():
            local, te = (m._branch(getattr(m, f"llm2connector_{branch}"), getattr(m, f"connector_{branch}"), states)
                         .float() for m in (built["local"], built["transformer_engine"]))
        error = (te - local).abs().max().item()
        assert error <= BF16_REL_LOSS * local.abs().max().item(), (branch, error)


def _cli(cwd, *flags, nproc: int = 1):
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = launcher + [str(ROOT / "pretrain_puffin.py"), f"@{TINY / 'model.args'}", f"@{TINY / 'stage2_sft.args'}",
                          "--pretrained-checkpoint", "", "--tensorboard-dir", "", "--bf16", "--train-iters", "4",
                          "--log-interval", "1", "--num-workers", "0", "--keep-last-n", "5", *map(str, flags)]
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-4000:]


def _losses(path):
    return {r["iteration"]: {k: v for k, v in r.items() if k.startswith("loss/")}
            for r in map(json.loads, path.read_text().splitlines())}


@needs_te
@pytest.mark.parametrize("precision", [
    ["--transformer-impl", "transformer_engine"],
    # FP8 on the LLM and the ViT (their tiny widths are multiples of 16, the ViT's 38 tokens per 96-pixel image get
    # padded; the tiny connector/DiT widths of 20 are not FP8 GEMM shapes)
    ["--transformer-impl", "transformer_engine", "--fp8-format", "hybrid", "--fp8-tower", "llm",
     "--fp8-tower", "vision"],
], ids=["te_bf16", "te_fp8_hybrid"])
def test_cli_trains_saves_and_resumes(tmp_path, precision):
    make_tiny_dataset(tmp_path / "tiny", num_samples=16)
    _cli(tmp_path, *precision, "--save", "run", "--save-interval", "2", "--metrics-file", "full.jsonl")
    _cli(tmp_path, *precision, "--load", "run/iter_0000002", "--metrics-file", "resumed.jsonl")
    full, resumed = _losses(tmp_path / "full.jsonl"), _losses(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == [3, 4]
    for iteration, losses in resumed.items():
        for task, loss in losses.items():
            assert loss == pytest.approx(full[iteration][task], rel=RESUME_REL), (iteration, task)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("impl", ["local", "transformer_engine"])
def test_two_process_nccl_tensor_parallel_run_matches_one_gpu(tmp_path, impl):
    if impl == "transformer_engine" and TE_REASON is not None:
        pytest.skip(f"Transformer Engine unusable: {TE_REASON}")
    make_tiny_dataset(tmp_path / "tiny", num_samples=16)
    flags = ["--transformer-impl", impl, "--freeze-vision"]
    _cli(tmp_path, *flags, "--metrics-file", "one.jsonl")
    _cli(tmp_path, *flags, "--tensor-model-parallel-size", "2", "--metrics-file", "two.jsonl", nproc=2)
    one, two = _losses(tmp_path / "one.jsonl"), _losses(tmp_path / "two.jsonl")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for iteration, losses in two.items():
        for task, loss in losses.items():
            assert loss == pytest.approx(one[iteration][task], rel=BF16_REL_LOSS), (iteration, task)
