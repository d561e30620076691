"""Importing released Puffin checkpoints: a synthetic state dict of tiny shapes under the reference names."""
import pytest
import torch

import megatron_puffin.distributed as mpd
from helpers.puffin import make_tiny_dataset, tiny_puffin_config
from megatron_puffin.convert.connector import mcore_to_reference
from megatron_puffin.convert.puffin import load_puffin_state_dict, puffin_to_mcore
from megatron_puffin.convert.common import ConversionError
from megatron_puffin.convert.qwen2 import mcore_to_hf
from megatron_puffin.convert.radio import mcore_to_projector, mcore_to_radio
from megatron_puffin.convert.sd3 import mcore_to_diffusers


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    paths = make_tiny_dataset(tmp_path_factory.mktemp("import"), num_samples=8)
    mpd.initialize(seed=0)
    yield paths
    mpd.destroy()


def _model(paths, seed):
    from megatron_puffin.models.puffin import build_puffin

    torch.manual_seed(seed)
    return build_puffin(tiny_puffin_config(paths), pg_collection=mpd.process_groups())


def _sub(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.endswith("_extra_state")}


def _reference_names(model):
    """Our weights written under the reference's names (docs/puffin.md §1.11), through the tower converters' inverses."""
    cfg, state = model.puffin_config, model.state_dict()
    ref = {"llm." + k: v for k, v in mcore_to_hf(_sub(state, "llm."), cfg.llm).items()}
    vision = _sub(state, "vision.")
    ref.update(mcore_to_radio(vision, cfg.vision, prefix="visual_encoder.radio_model."))
    ref.update(mcore_to_projector(vision, cfg.vision, cfg.llm.hidden_size))
    ref.update(mcore_to_reference(_sub(state, "conditioner."), cfg.connector, cfg.llm.hidden_size))
    ref.update({"transformer." + k: v for k, v in mcore_to_diffusers(_sub(state, "dit."), cfg.dit).items()})
    return ref


def _trainable_state(model):
    return {k: v for k, v in model.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}


def test_full_checkpoint_round_trips_bit_exact_into_a_fresh_model(setup):
    source, target = _model(setup, 1), _model(setup, 2)
    ours, supplied = puffin_to_mcore(_reference_names(source), target.puffin_config)
    assert supplied == ["dit", "llm", "projector", "queries", "vision"]
    missing = load_puffin_state_dict(target, ours)
    assert all("pos_embed.pos_embed" in k for k in missing), missing  # a fixed sin-cos table, not a weight
    for name, tensor in _trainable_state(source).items():
        assert torch.equal(target.state_dict()[name], tensor), name


def test_alignment_style_checkpoint_supplies_only_trainable_modules(setup):
    source, target = _model(setup, 1), _model(setup, 2)
    llm_before = {k: v.clone() for k, v in target.state_dict().items() if k.startswith("llm.") and torch.is_tensor(v)}
    partial = {k: v for k, v in _reference_names(source).items()
               if k.startswith(("projector.", "meta_queries", "llm2connector_", "connector_", "projector_1", "projector_2"))}
    ours, supplied = puffin_to_mcore(partial, target.puffin_config)
    assert supplied == ["projector", "queries"]
    load_puffin_state_dict(target, ours)
    assert torch.equal(target.state_dict()["conditioner.meta_queries"], source.state_dict()["conditioner.meta_queries"])
    for name, tensor in llm_before.items():  # towers absent from the file keep their base weights
        assert torch.equal(target.state_dict()[name], tensor), name


def test_unknown_and_incomplete_towers_are_clear_errors(setup):
    model = _model(setup, 1)
    reference = _reference_names(model)
    with pytest.raises(ConversionError, match="no known tower: mystery.weight"):
        puffin_to_mcore({**reference, "mystery.weight": torch.zeros(1)}, model.puffin_config)
    broken = {k: v for k, v in reference.items() if k != "llm.model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ConversionError, match="llm|up_proj"):
        puffin_to_mcore(broken, model.puffin_config)
