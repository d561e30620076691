"""Runs print no library chatter: megatron-core's and torch's deprecation notices about their own internals are
silenced by the entry points (unless --log-level DEBUG), and the towers' TransformerConfigs raise no warning."""
import warnings

import pytest
import torch

import megatron_puffin.distributed as mpd
from megatron_puffin.optional_deps import quiet_library_deprecations


@pytest.fixture
def single_process():
    mpd.initialize(seed=0)
    yield
    mpd.destroy()


def _checkpoint_round_trip(directory, quiet: bool):
    """The FutureWarnings of a real megatron-core distributed checkpoint save and load (the calls that warn)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    directory.mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if quiet:
            quiet_library_deprecations()
        dist_checkpointing.save({"a": ShardedTensor.from_rank_offsets("a", torch.arange(4.0))}, str(directory))
        loaded = dist_checkpointing.load({"a": ShardedTensor.from_rank_offsets("a", torch.zeros(4))}, str(directory))
    assert torch.equal(loaded["a"], torch.arange(4.0))
    return [w for w in caught if issubclass(w.category, FutureWarning)]


def test_checkpoint_deprecations_are_silenced_and_ours_are_not(single_process, tmp_path):
    assert _checkpoint_round_trip(tmp_path / "loud", quiet=False), "the libraries no longer warn: nothing checked"
    assert _checkpoint_round_trip(tmp_path / "quiet", quiet=True) == []
    with warnings.catch_warnings(record=True) as caught:  # only the libraries' own modules are silenced
        warnings.simplefilter("always")
        quiet_library_deprecations()
        warnings.warn_explicit("ours", FutureWarning, "x.py", 1, module="megatron_puffin.training.loop")
        warnings.warn_explicit("theirs", FutureWarning, "x.py", 1, module="megatron.core.dist_checkpointing.x")
    assert [str(w.message) for w in caught] == ["ours"]


def test_tower_transformer_configs_raise_no_warning():
    from megatron_puffin.models.connector import ConnectorConfig
    from megatron_puffin.models.dit import DiTConfig
    from megatron_puffin.models.llm import LLMConfig
    from megatron_puffin.models.vision import VisionConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # megatron-core's default cuda_graph_scope "full" warned at every config
        for tower in (LLMConfig(), VisionConfig(), ConnectorConfig(), DiTConfig()):
            tower.to_transformer_config()
