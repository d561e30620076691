"""Sequence parallelism pieces that need one process: the local norm, the padding helpers, the validation messages,
and the Transformer Engine specs by inspection (they run on a GPU only; the TP=2 parity of the local spec is
tests/distributed/test_puffin_sequence_parallel.py)."""
import ast
from pathlib import Path

import pytest
import torch
from megatron.core.extensions import transformer_engine as mte
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_puffin.config import ConfigError, parse_args
from megatron_puffin.models.sequence_parallel import (
    LocalNorm,
    gather_sequence,
    key_padding_mask,
    pad_sequence,
    split_sequence,
    token_multiple,
    with_sequence_parallel,
)

DATA = ["--dry-run", "--task-stream", "image2text:/data/und:4", "--tokenizer", "/tokenizer"]


def _config(normalization="RMSNorm", tp=2, sequence_parallel=True):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization=normalization,
                             tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
                             use_cpu_initialization=True)


@pytest.mark.parametrize("normalization, torch_class", [("RMSNorm", torch.nn.RMSNorm), ("LayerNorm", torch.nn.LayerNorm)])
def test_local_norm_is_the_torch_norm_with_its_weights_marked_for_the_tp_all_reduce(normalization, torch_class):
    norm = LocalNorm(_config(normalization), 8, eps=1e-6)
    assert type(norm) is torch_class and norm.eps == 1e-6
    assert all(param.sequence_parallel is True for param in norm.parameters())
    unmarked = LocalNorm(_config(normalization, tp=1, sequence_parallel=False), 8)
    assert all(param.sequence_parallel is False for param in unmarked.parameters())
    # Same module and checkpoint entries as megatron-core's norm, which refuses sequence parallelism.
    reference = WrappedTorchNorm(_config(normalization, tp=1, sequence_parallel=False), 8, eps=1e-6)
    assert reference.state_dict().keys() == norm.state_dict().keys()
    x = torch.randn(3, 2, 8)
    assert torch.equal(norm(x), reference(x))
    with pytest.raises(AssertionError, match="sequence parallel"):
        WrappedTorchNorm(_config(normalization), 8)


def test_local_norm_refuses_options_it_cannot_honour():
    config = _config()
    config.layernorm_zero_centered_gamma = True
    with pytest.raises(ValueError, match="zero-centred gamma"):
        LocalNorm(config, 8)


def test_padding_helpers_pad_at_the_end_and_mask_exactly_the_pads():
    x = torch.arange(5 * 2 * 3, dtype=torch.float32).view(5, 2, 3)
    padded, num_pads = pad_sequence(x, 4)
    assert padded.shape == (8, 2, 3) and num_pads == 3
    assert torch.equal(padded[:5], x) and not padded[5:].any()
    mask = key_padding_mask(5, 3, 2, x.device)
    assert mask.shape == (2, 1, 1, 8) and mask[..., 5:].all() and not mask[..., :5].any()
    assert key_padding_mask(5, 0, 2, x.device) is None
    assert token_multiple(16, 2) == 16 and token_multiple(1, 3) == 3 and token_multiple(16, 6) == 48


def test_without_sequence_parallelism_split_and_gather_are_the_identity():
    config = _config(tp=1, sequence_parallel=False)
    x = torch.randn(5, 2, 8)
    shard, num_pads = split_sequence(x, config)
    assert shard is x and num_pads == 0 and gather_sequence(x, config) is x
    assert with_sequence_parallel(config, True) is config  # TP=1: megatron-core would switch it off anyway
    original = _config(sequence_parallel=False)
    sp = with_sequence_parallel(original, True)
    assert sp is not original and sp.sequence_parallel and original.sequence_parallel is False
    assert with_sequence_parallel(sp, False).sequence_parallel is False and sp.sequence_parallel


def _problems(*flags):
    try:
        parse_args(DATA + list(flags))
    except ConfigError as error:
        return error.problems
    return []


def test_validation_accepts_sequence_parallelism_with_tp_and_names_what_blocks_it():
    assert _problems("--tensor-model-parallel-size", "2", "--world-size", "2", "--sequence-parallel") == []
    (problem,) = _problems("--sequence-parallel")
    assert problem == "--sequence-parallel has no effect with --tensor-model-parallel-size 1; drop it"
    problems = _problems("--tensor-model-parallel-size", "2", "--world-size", "2", "--sequence-parallel",
                         "--connector-num-queries", "63", "--connector-num-attention-heads", "2")
    assert any(p.startswith("--connector-num-queries (63) must be divisible by --tensor-model-parallel-size (2) "
                            "with --sequence-parallel") and "use a TP of 1, 3, 7, 9, 21, 63" in p for p in problems), problems


def test_te_specs_use_te_norms_which_take_sequence_parallelism_from_the_config():
    """The TE variants of every tower keep TE's own norms (marked by TE itself from ``config.sequence_parallel``) and
    TE linears (which all-gather / reduce-scatter under it); only the DiT's modulation stays a local linear, which
    the block builds without sequence parallelism (its input is ``temb [b, h]``)."""
    from megatron_puffin.models.dit.dit_layer_specs import dit_transformer_engine_layer_spec
    from megatron_puffin.models.llm.llm_layer_specs import llm_final_norm
    from megatron_puffin.models.common.encoder_layer_specs import encoder_transformer_engine_layer_spec

    encoder = encoder_transformer_engine_layer_spec().submodules
    assert encoder.input_layernorm is mte.TENorm and encoder.pre_mlp_layernorm is mte.TENorm
    assert encoder.self_attention.submodules.linear_qkv is mte.TEColumnParallelLinear
    assert llm_final_norm("transformer_engine") is mte.TENorm and llm_final_norm("local") is LocalNorm
    dit = dit_transformer_engine_layer_spec().submodules
    assert dit.attention.submodules.linear_proj is mte.TERowParallelLinear
    from megatron.core.tensor_parallel import ColumnParallelLinear

    assert dit.modulation is ColumnParallelLinear
    # TENorm and TE's fused norm-linear hand config.sequence_parallel to Transformer Engine (read from the source:
    # without TE the wrappers are built on a stand-in base).
    tree = ast.parse(Path(mte.__file__).read_text())
    for name in ("TENorm", "TELayerNormColumnParallelLinear", "TELinear"):  # TELinear: base of the TE column/row linears
        cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == name)
        assert "config.sequence_parallel" in ast.unparse(cls), name


def test_local_specs_use_the_local_norm_everywhere():
    from megatron_puffin.models.llm.llm_layer_specs import get_llm_layer_local_spec
    from megatron_puffin.models.common.encoder_layer_specs import get_encoder_layer_local_spec

    for spec in (get_llm_layer_local_spec(), get_encoder_layer_local_spec()):
        assert spec.submodules.input_layernorm is LocalNorm and spec.submodules.pre_mlp_layernorm is LocalNorm


def test_sequence_parallel_disabled_switches_modules_and_configs_off_and_back_also_on_errors():
    from megatron_puffin.models.sequence_parallel import sequence_parallel_disabled

    config = _config()
    linear, plain = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    linear.sequence_parallel, linear.config, plain.sequence_parallel = True, config, False
    model = torch.nn.Sequential(linear, plain)
    with pytest.raises(RuntimeError, match="inside"):
        with sequence_parallel_disabled(model):
            assert linear.sequence_parallel is False and config.sequence_parallel is False
            raise RuntimeError("inside")
    assert linear.sequence_parallel is True and config.sequence_parallel is True and plain.sequence_parallel is False
