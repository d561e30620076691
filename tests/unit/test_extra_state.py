"""Checkpoints across implementations: exactly Transformer Engine's ``_extra_state`` entries are created or ignored.

The "TE-like" modules here carry extra state the way TE's do (torch's ``get_extra_state`` / ``set_extra_state``,
a serialised tensor; megatron-core turns it into a ``ShardedObject``), and one of them leaves it out of its sharded
state dict as megatron-core's TE attention does. Real megatron-core distributed checkpoints, one process.
"""
import pytest
import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

import megatron_puffin.distributed as mpd
from megatron_puffin.models.extra_state import StateDictMismatch, is_extra_state_key, load_model_state
from megatron_puffin.checkpointing import CheckpointMismatch, load_model_checkpoint, save_checkpoint


class ExtraStateLinear(torch.nn.Linear):
    """A linear with FP8-style metadata in its extra state (TE serialises it into a uint8 tensor)."""

    def __init__(self, size: int) -> None:
        super().__init__(size, size)
        self.amax_history = torch.rand(4)
        self.loaded_extra = None

    def get_extra_state(self) -> torch.Tensor:
        return self.amax_history.clone()

    def set_extra_state(self, state) -> None:
        self.loaded_extra = state


class AttentionLikeExtraState(ExtraStateLinear):
    """Like megatron-core's TEDotProductAttention: extra state in ``state_dict()``, not in the sharded one."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        state = {k: v for k, v in self.state_dict(prefix="", keep_vars=True).items() if not is_extra_state_key(k)}
        return make_sharded_tensors_for_checkpoint(state, prefix, sharded_offsets=sharded_offsets)


class Tower(MegatronModule):
    def __init__(self, te_like: bool, extra_tensor: bool = False, seed: int = 0) -> None:
        torch.manual_seed(seed)
        super().__init__(TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1,
                                           use_cpu_initialization=True))
        self.proj = ExtraStateLinear(4) if te_like else torch.nn.Linear(4, 4)
        self.core_attention = AttentionLikeExtraState(4) if te_like else torch.nn.Linear(4, 4)
        if extra_tensor:
            self.gate = torch.nn.Linear(4, 4)


@pytest.fixture()
def single_process():
    mpd.initialize(seed=0)
    yield
    mpd.destroy()


def _weights(model):
    return {k: v for k, v in model.state_dict().items() if not is_extra_state_key(k)}


def test_local_te_and_te_te_round_trips(single_process, tmp_path):
    local, te = Tower(te_like=False, seed=1), Tower(te_like=True, seed=2)
    save_checkpoint(local.sharded_state_dict(), str(tmp_path / "local"))
    save_checkpoint(te.sharded_state_dict(), str(tmp_path / "te"))

    from_local = Tower(te_like=True, seed=3)  # local -> TE: extra state absent, modules keep their own
    load_model_checkpoint(from_local, str(tmp_path / "local"))
    for key, value in _weights(local).items():
        assert torch.equal(from_local.state_dict()[key], value), key
    assert from_local.proj.loaded_extra is None

    from_te = Tower(te_like=True, seed=4)  # TE -> TE: extra state restored (where it was saved)
    load_model_checkpoint(from_te, str(tmp_path / "te"))
    assert torch.equal(from_te.proj.loaded_extra, te.proj.amax_history)
    assert from_te.core_attention.loaded_extra is None  # never in the sharded state dict
    for key, value in _weights(te).items():
        assert torch.equal(from_te.state_dict()[key], value), key

    to_local = Tower(te_like=False, seed=5)  # TE -> local: the checkpoint's extra state is ignored
    load_model_checkpoint(to_local, str(tmp_path / "te"))
    for key, value in _weights(te).items():
        assert torch.equal(to_local.state_dict()[key], value), key


def test_a_truly_missing_tensor_is_still_an_error_naming_it(single_process, tmp_path):
    save_checkpoint(Tower(te_like=True).sharded_state_dict(), str(tmp_path / "te"))
    with pytest.raises(CheckpointMismatch, match=r"lacks 2 tensor\(s\) of the model: gate\.bias, gate\.weight"):
        load_model_checkpoint(Tower(te_like=True, extra_tensor=True), str(tmp_path / "te"))
    model = Tower(te_like=False)
    state = _weights(model)
    with pytest.raises(StateDictMismatch, match=r"missing 1: proj\.bias"):
        load_model_state(model, {k: v for k, v in state.items() if k != "proj.bias"})
    with pytest.raises(StateDictMismatch, match=r"unexpected 1: stray\.weight"):
        load_model_state(model, {**state, "stray.weight": torch.zeros(1)})
    load_model_state(model, {**state, "proj._extra_state": torch.zeros(1)})  # only extra state may differ


def test_the_inference_loader_loads_across_implementations_too(single_process, tmp_path):
    """understand.py / generate.py load a checkpoint's towers with the training loader: a model built with
    Transformer Engine (extra state) from a checkpoint trained with the local layers, and back. Before, the
    inference loader asked the checkpoint for every extra-state entry of the model and failed on the first one."""
    from megatron_puffin.inference.loading import InferenceSetupError, _load_towers

    class Model(torch.nn.Module):
        def __init__(self, te_like: bool, seed: int, extra_tensor: bool = False) -> None:
            super().__init__()
            self.llm = Tower(te_like=te_like, seed=seed, extra_tensor=extra_tensor)

    local, te = Model(te_like=False, seed=1), Model(te_like=True, seed=2)
    save_checkpoint(local.llm.sharded_state_dict(prefix="llm."), str(tmp_path / "local"))
    save_checkpoint(te.llm.sharded_state_dict(prefix="llm."), str(tmp_path / "te"))
    for source, target in ((local, Model(te_like=True, seed=3)), (te, Model(te_like=False, seed=4)),
                           (te, Model(te_like=True, seed=5))):
        _load_towers(target, str(tmp_path / ("te" if source is te else "local")), ["llm"])
        for key, value in _weights(source).items():
            assert torch.equal(target.state_dict()[key], value), key
    with pytest.raises(InferenceSetupError, match=r"does not fit the model shape \(2 tensor\(s\) differ, e\.g\. "
                                                  r"llm\.gate\.bias"):
        _load_towers(Model(te_like=True, seed=6, extra_tensor=True), str(tmp_path / "te"), ["llm"])


def test_extra_state_keys():
    assert is_extra_state_key("llm.decoder.layers.0.self_attention.linear_qkv._extra_state")
    assert is_extra_state_key("decoder.layers.self_attention.core_attention._extra_state/shard_0_1")
    assert is_extra_state_key("_extra_state")
    assert not is_extra_state_key("decoder.layers.mlp.linear_fc1.layer_norm_weight")
    assert not is_extra_state_key("my_extra_state.weight") and not is_extra_state_key("x.not_extra_state")
