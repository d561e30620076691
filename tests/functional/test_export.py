"""Exporting what was trained (tools/convert_checkpoint.py mcore-to-hf / mcore-to-towers) from a real training
checkpoint written at PP=2 by two ranks (the LLM's TP=2 case: test_convert_checkpoint.py): transformers loads the
exported LLM and its logits equal our LLM tower's (fp32, atol 1e-5), the tokenizer and generation config are in the
directory; the vision tower and query path reload from our format bit-identical to the checkpoint's tensors, and
the reloaded vision tower gives the same features."""
import importlib.util
import json
import shutil

import pytest
import torch

from helpers.puffin import ROOT, tiny_pp_run

TOOL = ROOT / "tools" / "convert_checkpoint.py"


def _tool():
    spec = importlib.util.spec_from_file_location("convert_checkpoint_export", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The shared tiny run at PP=2 with the distributed optimizer (helpers.puffin.tiny_pp_run: 4 steps; LLM layers
    split; vision tower and connectors on different ranks), copied; its working directory, the run in ``run/``."""
    root = tmp_path_factory.mktemp("export")
    shared = tiny_pp_run()
    shutil.copytree(shared / "tiny", root / "tiny")
    shutil.copytree(shared / "pp", root / "run")
    return root


def _our_llm(directory):
    """Our LLM tower of the checkpoint (TP=1) and its logits for fixed ids."""
    import megatron_puffin.distributed as mpd
    from megatron_puffin.convert.export import load_llm, resolve_source

    mpd.initialize(seed=0)
    try:
        model, config = load_llm(resolve_source(str(directory)))
        ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
        positions = torch.arange(11).expand(2, 11)
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=positions).transpose(0, 1)[..., :config.vocab_size]
        return ids, logits
    finally:
        mpd.destroy()


def test_trained_llm_exports_to_hugging_face_with_identical_logits(trained, monkeypatch):
    from transformers import Qwen2ForCausalLM

    from megatron_puffin.data.tokenizer import PuffinTokenizer

    monkeypatch.chdir(trained)  # the run's --tokenizer (tiny/tokenizer.model) is relative to where it trained
    _tool().main(["mcore-to-hf", "--input", "run", "--output", "hf"])  # the run directory: its latest checkpoint
    exported = trained / "hf"
    hf = Qwen2ForCausalLM.from_pretrained(exported, torch_dtype=torch.float32, attn_implementation="eager").eval()
    ids, ours = _our_llm(trained / "run" / "iter_0000004")
    with torch.no_grad():
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    assert (exported / "tokenizer.model").read_bytes() == (trained / "tiny" / "tokenizer.model").read_bytes()
    generation = json.loads((exported / "generation_config.json").read_text())
    tokenizer = PuffinTokenizer(exported / "tokenizer.model")
    assert generation["eos_token_id"] == [tokenizer.eos_id, tokenizer.pad_id]
    assert generation["pad_token_id"] == tokenizer.pad_id and generation["bos_token_id"] is None

    with pytest.raises(SystemExit, match="no complete checkpoint there"):
        _tool().main(["mcore-to-hf", "--input", "tiny", "--output", "other"])

    # An export failing after its weights are written (a tokenizer folder without tokenizer files) leaves nothing
    # behind: before, the partial "other" (config + weights) also made the corrected re-run refuse it as existing.
    (trained / "not_a_tokenizer").mkdir()
    with pytest.raises(SystemExit, match="holds no tokenizer files"):
        _tool().main(["mcore-to-hf", "--input", "run", "--output", "other", "--tokenizer", "not_a_tokenizer"])
    assert sorted(p.name for p in trained.iterdir() if "other" in p.name) == []
    (trained / "garbled_tokenizer").mkdir()  # its tokenizer.json is there but does not load: was a traceback
    (trained / "garbled_tokenizer" / "tokenizer.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match=r"--tokenizer garbled_tokenizer: garbled_tokenizer cannot be loaded as a "):
        _tool().main(["mcore-to-hf", "--input", "run", "--output", "other", "--tokenizer", "garbled_tokenizer"])
    assert sorted(p.name for p in trained.iterdir() if "other" in p.name) == []
    assert _tool().main(["mcore-to-hf", "--input", "run", "--output", "other"]) == 0
    assert (trained / "other" / "model.safetensors").read_bytes() == (exported / "model.safetensors").read_bytes()


def test_vision_tower_and_query_path_round_trip_through_our_format(trained):
    import megatron_puffin.distributed as mpd
    from megatron_puffin.convert.export import build_tower, load_exported_towers, resolve_source
    from megatron_puffin.checkpointing import load_module

    checkpoint = trained / "run" / "iter_0000004"
    _tool().main(["mcore-to-towers", "--input", str(checkpoint), "--output", str(trained / "towers")])
    manifest = json.loads((trained / "towers" / "puffin_towers.json").read_text())
    assert (manifest["towers"], manifest["iteration"], manifest["llm_hidden_size"]) == (["vision", "queries"], 4, 48)

    source = resolve_source(str(checkpoint))
    mpd.initialize(seed=5)
    try:
        reloaded = load_exported_towers(str(trained / "towers"))
        for tower, prefix in (("vision", "vision."), ("queries", "conditioner.")):
            direct = build_tower(tower, source.args["vision"], source.args["connector"], 48)
            load_module(direct, str(checkpoint), prefix=prefix)
            expected, got = direct.state_dict(), reloaded[tower].state_dict()
            names = [k for k in expected if torch.is_tensor(expected[k]) and not k.endswith("_extra_state")]
            assert len(names) > 5
            for name in names:
                assert torch.equal(got[name], expected[name]), (tower, name)
        images = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
        with torch.no_grad():
            direct_vision = build_tower("vision", source.args["vision"], source.args["connector"], 48)
            load_module(direct_vision, str(checkpoint), prefix="vision.")
            torch.testing.assert_close(reloaded["vision"].eval()(images), direct_vision.eval()(images), rtol=0, atol=0)
        _garbled_towers_are_one_export_error(trained / "towers", trained / "garbled_towers")
    finally:
        mpd.destroy()


def _garbled_towers_are_one_export_error(towers, garbled):
    """A hand-edited towers manifest or a damaged tower file is one ExportError naming it (were a KeyError, a
    TypeError from a config dataclass, or safetensors' own error naming no file)."""
    from megatron_puffin.convert.export import ExportError, load_exported_towers

    manifest = json.loads((towers / "puffin_towers.json").read_text())
    for change, message in (({"dtype": "int4"}, "dtype 'int4' is not one of float32"),
                            ({"towers": ["vision", "dit"]}, "towers ['vision', 'dit'] is not a list of vision"),
                            ({"vision_config": None}, "vision_config is not a JSON object"),
                            ({"llm_hidden_size": "48"}, "llm_hidden_size '48' is not a positive whole number"),
                            ({"connector_config": {**manifest["connector_config"], "unknown_knob": 1}},
                             "the queries tower cannot be built from its config (")):
        shutil.rmtree(garbled, ignore_errors=True)
        shutil.copytree(towers, garbled)
        (garbled / "puffin_towers.json").write_text(json.dumps({**manifest, **change}))
        with pytest.raises(ExportError, match="export the towers again") as raised:
            load_exported_towers(str(garbled))
        assert message in str(raised.value), raised.value
    shutil.rmtree(garbled)
    shutil.copytree(towers, garbled)
    (garbled / "vision.safetensors").write_bytes(b"garbage")
    with pytest.raises(ExportError, match="vision.safetensors is not a readable safetensors file"):
        load_exported_towers(str(garbled))
    (garbled / "vision.safetensors").unlink()
    with pytest.raises(ExportError, match="vision.safetensors is not a readable safetensors file"):
        load_exported_towers(str(garbled))


def _towers_of(checkpoint, towers):
    """The tensors of ``towers`` in ``checkpoint`` (a training or puffin-to-mcore checkpoint), loaded into a TP=1
    model built from its stored flags."""
    import dataclasses

    import megatron_puffin.distributed as mpd
    from megatron_puffin.inference.loading import resolve_flags
    from megatron_puffin.config.model import puffin_config
    from megatron_puffin.models.puffin import build_puffin
    from megatron_puffin.checkpointing import load_module, read_metadata
    from megatron_puffin.models.puffin import CHECKPOINT_MODULES

    config = puffin_config(resolve_flags(read_metadata(str(checkpoint))))
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, vae_config=None))
    mpd.initialize(seed=3)
    try:
        model = build_puffin(config, pg_collection=mpd.process_groups())
        prefixes = tuple(f"{CHECKPOINT_MODULES[tower]}." for tower in towers)
        for prefix in prefixes:
            load_module(getattr(model, prefix.rstrip(".")), str(checkpoint), prefix=prefix)
        return {k: v.clone() for k, v in model.state_dict().items()
                if k.startswith(prefixes) and torch.is_tensor(v) and not k.endswith("_extra_state")}
    finally:
        mpd.destroy()


def test_whole_model_exports_to_the_released_puffin_layout_and_imports_back_unchanged(trained):
    """mcore-to-puffin writes the released Puffin-*.pth names (plain tensors: weights_only loads it); puffin-to-mcore
    of that file gives back every tensor of the PP=2, distributed-optimizer checkpoint, bit for bit."""
    checkpoint = trained / "run" / "iter_0000004"
    exported = trained / "Puffin-Run.pth"
    _tool().main(["mcore-to-puffin", "--input", str(trained / "run"), "--output", str(exported)])
    state = torch.load(exported, weights_only=True)
    for prefix in ("llm.model.layers.0.", "visual_encoder.radio_model.", "projector.0.", "meta_queries",
                   "connector_1.", "transformer.transformer_blocks.0."):
        assert any(name.startswith(prefix) for name in state), prefix
    assert not any(name.startswith(("vae.", "vision.", "conditioner.", "dit.")) for name in state)

    _tool().main(["puffin-to-mcore", "--puffin-checkpoint", str(exported), "--output", str(trained / "reimported"),
                  "--", f"@{ROOT / 'examples' / 'tiny' / 'model.args'}"])
    towers = ["llm", "vision", "queries", "dit"]
    original, reimported = _towers_of(checkpoint, towers), _towers_of(trained / "reimported", towers)
    assert sorted(original) == sorted(reimported) and len(original) > 50
    for name, tensor in original.items():
        assert torch.equal(reimported[name], tensor), name

    before = exported.read_bytes()  # never overwritten: one line, exit 2, the file as it was
    assert _tool().main(["mcore-to-puffin", "--input", str(trained / "run"), "--output", str(exported)]) == 2
    assert exported.read_bytes() == before
