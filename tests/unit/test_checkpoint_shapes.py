"""The validation pass's model-shape check of loaded checkpoints (megatron_puffin/config/validate_paths.py) on the
sidecars each kind of checkpoint carries: a training checkpoint (flags by concern and its towers) and the converted
tower checkpoints of tools/convert_checkpoint.py (one tower's config). Through the CLI, with a real checkpoint:
tests/functional/test_flag_cli.py."""
import dataclasses

import pytest

from megatron_puffin.config import parse_args
from megatron_puffin.training.preflight import checkpoint_shape_problems
from megatron_puffin.models.dit import DiTConfig
from megatron_puffin.models.llm import LLMConfig

from helpers.puffin import ROOT


@pytest.fixture(scope="module")
def args():
    """The tiny model's flags (examples/tiny/model.args), unvalidated (its data paths are relative)."""
    return parse_args([f"@{ROOT / 'examples' / 'tiny' / 'model.args'}", "--task-stream", "image2text:x"],
                      validate=False)


def test_training_checkpoint_compares_the_towers_it_holds(args):
    stored = args.to_dict()
    assert checkpoint_shape_problems(args, "--load", "run/iter_2", {"args": stored}, True) == []
    stored["llm"].update(num_layers=4, kv_channels=None, num_attention_heads=6, hidden_size=48)  # 48/6 = 8: same
    stored["dit"]["attention_head_dim"] = 16
    stored["connector"]["num_queries"] = 8
    meta = {"args": stored, "towers": ["llm", "vision", "queries", "dit"]}
    (problem,) = checkpoint_shape_problems(args, "--load", "run/iter_2", meta, True)
    assert problem.startswith("--load run/iter_2 holds a model of another shape than the flags give: "
                              "--num-layers 4 (checkpoint) vs 2 (flags); --connector-num-queries 8 (checkpoint) vs "
                              "4 (flags); --dit-attention-head-dim 16 (checkpoint) vs 8 (flags). Give")
    assert "--kv-channels" not in problem  # unset in the checkpoint means hidden size / heads, which is 8 as given

    # --pretrained-checkpoint loads only the towers the checkpoint lists; --load needs them all.
    dit_only = {"args": stored, "towers": ["dit"]}
    (problem,) = checkpoint_shape_problems(args, "--pretrained-checkpoint", "ckpt", dit_only, False)
    assert "--dit-attention-head-dim 16" in problem and "--num-layers" not in problem
    (problem,) = checkpoint_shape_problems(args, "--load", "ckpt", dit_only, True)
    assert "it holds no llm, vision, queries tower (towers: dit), which a resume needs; start from it with " \
           "--pretrained-checkpoint ckpt instead" in problem


def test_converted_tower_checkpoints_compare_their_tower_config(args):
    llm = dataclasses.asdict(args.llm)
    assert checkpoint_shape_problems(args, "--llm-checkpoint", "hf", {"kind": "llm", "llm_config": llm}, False) == []
    llm = dataclasses.asdict(LLMConfig(num_layers=2, hidden_size=64, ffn_hidden_size=64, num_attention_heads=8,
                                       num_query_groups=2, kv_channels=8, vocab_size=1024))
    (problem,) = checkpoint_shape_problems(args, "--llm-checkpoint", "hf", {"kind": "llm", "llm_config": llm}, False)
    assert "--hidden-size 64 (checkpoint) vs 48 (flags); --num-attention-heads 8 (checkpoint) vs 6 (flags)" in problem

    vision = {"kind": "vision", "vision_config": dataclasses.asdict(args.vision), "llm_hidden_size": 32}
    (problem,) = checkpoint_shape_problems(args, "--vision-checkpoint", "radio", vision, False)
    assert problem.startswith("--vision-checkpoint radio holds a model of another shape than the flags give: "
                              "--hidden-size 32 (checkpoint) vs 48 (flags). Give")  # the projector's output size

    dit = {"kind": "dit", "dit_config": dataclasses.asdict(DiTConfig())}  # SD3-medium sizes against the tiny flags
    (problem,) = checkpoint_shape_problems(args, "--dit-checkpoint", "sd3", dit, False)
    assert "--dit-num-layers 24 (checkpoint) vs 2 (flags)" in problem and "--dit-in-channels 16" in problem
