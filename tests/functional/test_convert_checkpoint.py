"""tools/convert_checkpoint.py end to end: HF -> distributed checkpoint written at TP=2 by two ranks -> HF,
loadable by transformers and bit-identical to the original; diffusers SD3 <-> MMDiT checkpoint (bit-exact);
a RADIO checkpoint -> a vision checkpoint that --vision-checkpoint loads; a released Puffin .pth -> a whole-model
checkpoint that starts a stage through --pretrained-checkpoint (only the towers the file supplied)."""
import functools
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from helpers.llm import hf_qwen2, tiny_llm_config
from helpers.puffin import run_pretrain, run_script

ROOT = Path(__file__).resolve().parents[2]
TOOL = str(ROOT / "tools" / "convert_checkpoint.py")


def _torchrun(*args):
    """``torchrun --standalone --nproc-per-node 2 tools/convert_checkpoint.py ARGS``: the two ranks forked from the
    suite's pre-imported server, with torchrun's variables (helpers.puffin.run_script)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return run_script(TOOL, *args, nproc=2, env=env, timeout=600)


def test_hf_round_trip_through_a_tp2_distributed_checkpoint(tmp_path):
    from transformers import Qwen2ForCausalLM

    config = tiny_llm_config(tied=True, num_attention_heads=12, num_query_groups=2, kv_channels=8)
    original = hf_qwen2(config, seed=4)
    original.save_pretrained(tmp_path / "hf_in", safe_serialization=True)

    _torchrun("hf-to-mcore", "--hf-dir", str(tmp_path / "hf_in"), "--output", str(tmp_path / "ckpt"),
              "--tensor-model-parallel-size", "2")
    assert (tmp_path / "ckpt" / "puffin_meta.json").exists() and not (tmp_path / "ckpt.tmp").exists()
    # The one-process direction in this process (tools/convert_checkpoint.py's main(), see below): no interpreter start.
    assert _tool().main(["mcore-to-hf", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf_out")]) == 0

    restored = Qwen2ForCausalLM.from_pretrained(
        tmp_path / "hf_out", torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    original_state, restored_state = original.state_dict(), restored.state_dict()
    assert sorted(original_state) == sorted(restored_state)
    for name, tensor in original_state.items():
        assert torch.equal(restored_state[name], tensor), name
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(restored(ids).logits, original(ids).logits, rtol=0, atol=0)


# --- MMDiT, RADIO and released Puffin files ------------------------------------------------------------------------
# Conversions that run as one process are called in this process (tools/convert_checkpoint.py's main()), which
# saves an interpreter start each; the TP=2 writes run on two ranks (``_torchrun``).
TINY = ROOT / "examples" / "tiny"
TINY_SD3 = dict(sample_size=24, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=20, caption_projection_dim=16, pooled_projection_dim=24,
                pos_embed_max_size=16)


@functools.lru_cache(maxsize=None)
def _tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _meta(directory):
    return json.loads((Path(directory) / "puffin_meta.json").read_text())


def _tiny_flags(*extra):
    from megatron_puffin.config import parse_args

    return parse_args([f"@{TINY / 'model.args'}", *extra], validate=False)


def _weights(state, prefix=""):
    return {k[len(prefix):]: v.detach().clone() for k, v in state.items()
            if k.startswith(prefix) and torch.is_tensor(v) and not k.endswith("_extra_state")}


def test_sd3_transformer_round_trips_bit_exact_through_a_tp2_checkpoint(tmp_path):
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    torch.manual_seed(5)
    SD3Transformer2DModel(**TINY_SD3).to(torch.bfloat16).save_pretrained(tmp_path / "sd3_in")
    _torchrun("sd3-to-mcore", "--transformer-dir", str(tmp_path / "sd3_in"), "--output", str(tmp_path / "ckpt"),
              "--tensor-model-parallel-size", "2")
    meta = _meta(tmp_path / "ckpt")
    assert (meta["kind"], meta["saved_layout"], meta["source_dtype"]) == ("dit", {"tp": 2, "pp": 1}, "bfloat16")
    assert meta["dit_config"]["num_layers"] == 2

    _tool().main(["mcore-to-sd3", "--input", str(tmp_path / "ckpt"), "--output", str(tmp_path / "sd3_out")])
    name = "diffusion_pytorch_model.safetensors"
    original, restored = load_file(tmp_path / "sd3_in" / name), load_file(tmp_path / "sd3_out" / name)
    assert sorted(original) == sorted(restored)
    for key, tensor in original.items():
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key], tensor), key
    assert json.loads((tmp_path / "sd3_out" / "config.json").read_text()) == \
        json.loads((tmp_path / "sd3_in" / "config.json").read_text())
    SD3Transformer2DModel.from_pretrained(tmp_path / "sd3_out")  # diffusers reads it back


def test_radio_checkpoint_becomes_a_tp2_vision_checkpoint_that_the_loop_loads(tmp_path):
    from safetensors.torch import save_file

    import megatron_puffin.distributed as mpd
    from megatron_puffin.convert.radio import mcore_to_radio
    from megatron_puffin.models.vision import build_vision
    from megatron_puffin.checkpointing import load_module

    flags = _tiny_flags()
    mpd.initialize(seed=3)
    try:
        source = _weights(build_vision(flags.vision, flags.llm.hidden_size,
                                       pg_collection=mpd.process_groups()).state_dict())
    finally:
        mpd.destroy()
    source["input_conditioner.norm_mean"] = torch.rand(3, 1, 1)  # not just the CLIP defaults
    radio = mcore_to_radio(source, flags.vision)  # the HF RADIOModel names: radio_model.*
    radio.update({"radio_model.summary_idxs": torch.tensor([0, 1]),  # tensors Puffin does not use
                  "radio_model.adaptors.clip.head.weight": torch.zeros(2, 16)})
    save_file({k: v.contiguous() for k, v in radio.items()}, tmp_path / "radio.safetensors")

    _torchrun("radio-to-mcore", "--radio-checkpoint", str(tmp_path / "radio.safetensors"), "--output",
              str(tmp_path / "ckpt"), "--tensor-model-parallel-size", "2", "--", f"@{TINY / 'model.args'}")
    meta = _meta(tmp_path / "ckpt")
    assert (meta["kind"], meta["saved_layout"], meta["llm_hidden_size"]) == ("vision", {"tp": 2, "pp": 1}, 48)
    assert meta["projector"].startswith("random initialisation")

    mpd.initialize(seed=11)  # what --vision-checkpoint does: the whole tower, strictly, at another layout
    try:
        target = build_vision(flags.vision, flags.llm.hidden_size, pg_collection=mpd.process_groups())
        load_module(target, str(tmp_path / "ckpt"), prefix="", what="--vision-checkpoint")
        loaded = _weights(target.state_dict())
    finally:
        mpd.destroy()
    encoder = [k for k in source if not k.startswith("projector.")]
    assert encoder and all(torch.equal(loaded[k], source[k]) for k in encoder)
    assert {k for k in loaded if k.startswith("projector.")} == {k for k in source if k.startswith("projector.")}

    with pytest.raises(SystemExit, match=r"--vision-hidden-size 16 \(now 1280\)"):  # default C-RADIOv3-H flags
        _tool().main(["radio-to-mcore", "--radio-checkpoint", str(tmp_path / "radio.safetensors"),
                      "--output", str(tmp_path / "other")])


def _released_puffin(path, towers, seed):
    """A tiny Puffin (examples/tiny/model.args) saved under the released names with only ``towers`` (reference
    tower names), plus a VAE tensor; returns our state dict of the model it came from."""
    import dataclasses

    import megatron_puffin.distributed as mpd
    from helpers.puffin import reference_state_dict
    from megatron_puffin.convert.puffin import tower_of
    from megatron_puffin.config.model import puffin_config
    from megatron_puffin.models.puffin import build_puffin

    config = puffin_config(_tiny_flags())
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, vae_config=None))
    mpd.initialize(seed=seed)
    try:
        model = build_puffin(config, pg_collection=mpd.process_groups())
        reference = {k: v for k, v in reference_state_dict(model).items() if tower_of(k) in towers}
        ours = _weights(model.state_dict())
    finally:
        mpd.destroy()
    torch.save({**reference, "vae.encoder.conv_in.bias": torch.zeros(4)}, path)
    return ours


def _load_towers(directory, prefixes):
    """Our tensors of a fresh tiny model after loading each ``module.`` prefix from ``directory`` as
    --pretrained-checkpoint does."""
    import dataclasses

    import megatron_puffin.distributed as mpd
    from megatron_puffin.config.model import puffin_config
    from megatron_puffin.models.puffin import build_puffin
    from megatron_puffin.checkpointing import load_module

    config = puffin_config(_tiny_flags())
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, vae_config=None))
    mpd.initialize(seed=99)
    try:
        model = build_puffin(config, pg_collection=mpd.process_groups())
        for prefix in prefixes:
            load_module(getattr(model, prefix.rstrip(".")), str(directory), prefix=prefix)
        return _weights(model.state_dict())
    finally:
        mpd.destroy()


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
    from helpers.puffin import make_tiny_dataset

    root = tmp_path_factory.mktemp("puffin_import")
    make_tiny_dataset(root / "tiny", num_samples=4, num_heldout=4)  # the tiny stage files validate on it
    return root


def test_released_puffin_file_starts_a_stage_through_pretrained_checkpoint(tiny_workdir):
    released = tiny_workdir / "Puffin-Partial.pth"
    source = _released_puffin(released, {"llm", "queries"}, seed=7)
    out = tiny_workdir / "imported"
    _tool().main(["puffin-to-mcore", "--puffin-checkpoint", str(released), "--output", str(out),
                  "--", f"@{TINY / 'model.args'}"])
    meta = _meta(out)
    assert (meta["kind"], meta["iteration"], meta["towers"]) == ("puffin", 0, ["llm", "queries"])
    assert meta["lineage"] == [{"stage": "imported", "source": str(released)}]
    assert meta["args"]["llm"]["hidden_size"] == 48 and meta["imported"]["ignored"] == ["vae"]
    loaded = _load_towers(out, ["llm.", "conditioner."])
    for key in [k for k in source if k.startswith(("llm.", "conditioner."))]:
        assert torch.equal(loaded[key], source[key]), key

    proc = run_pretrain(tiny_workdir, f"@{TINY / 'model.args'}", f"@{TINY / 'stage1_alignment.args'}",
                        "--num-workers", "0", "--train-iters", "1", "--lr-warmup-iters", "0", "--save", "stage1",
                        "--tensorboard-dir", "none", "--metrics-file", "none", "--pretrained-checkpoint", str(out))
    for tower in ("llm", "queries"):
        assert f"weights of {tower:<8} <- pretrained checkpoint {out}" in proc.stderr, proc.stderr[-3000:]
    for tower in ("vision", "dit"):
        assert f"weights of {tower:<8} <- random initialisation" in proc.stderr, proc.stderr[-3000:]
    lineage = _meta(tiny_workdir / "stage1" / "iter_0000001")["lineage"]
    assert [entry["stage"] for entry in lineage] == ["imported", "stage1_alignment"]


def test_released_projector_without_encoder_needs_the_base_vision_checkpoint(tmp_path):
    import dataclasses

    import megatron_puffin.distributed as mpd
    from megatron_puffin.config.model import puffin_config
    from megatron_puffin.models.puffin import build_puffin
    from megatron_puffin.checkpointing import save_checkpoint

    released = tmp_path / "Puffin-Align.pth"
    source = _released_puffin(released, {"projector", "queries", "dit"}, seed=7)
    command = ["puffin-to-mcore", "--puffin-checkpoint", str(released), "--output", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="--vision-checkpoint"):
        _tool().main([*command, f"@{TINY / 'model.args'}"])

    config = puffin_config(_tiny_flags())
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, vae_config=None))
    mpd.initialize(seed=21)  # a base vision tower, as radio-to-mcore writes it
    try:
        base_model = build_puffin(config, pg_collection=mpd.process_groups())
        base = _weights(base_model.vision.state_dict())
        save_checkpoint(base_model.vision.sharded_state_dict(), str(tmp_path / "base_vision"))
    finally:
        mpd.destroy()
    _tool().main([*command, f"@{TINY / 'model.args'}", "--vision-checkpoint", str(tmp_path / "base_vision")])
    meta = _meta(tmp_path / "out")
    assert meta["towers"] == ["vision", "queries", "dit"]
    assert meta["imported"]["completed"]["vision"].startswith("encoder from --vision-checkpoint")
    loaded = _load_towers(tmp_path / "out", ["vision."])
    for key, tensor in base.items():
        expected = source["vision." + key] if key.startswith("projector.") else tensor
        assert torch.equal(loaded["vision." + key], expected), key

    # The MMDiT of a whole-model checkpoint exports to diffusers, bit-exact against the released tensors.
    from safetensors.torch import load_file

    _tool().main(["mcore-to-sd3", "--input", str(tmp_path / "out"), "--output", str(tmp_path / "sd3")])
    exported = load_file(tmp_path / "sd3" / "diffusion_pytorch_model.safetensors")
    released_dit = {k[len("transformer."):]: v for k, v in torch.load(released, weights_only=True).items()
                    if k.startswith("transformer.")}
    assert sorted(exported) == sorted(released_dit)
    assert all(torch.equal(exported[k], v) for k, v in released_dit.items())
