"""Every tower's Transformer Engine spec, inspected on CPU without Transformer Engine.

A spec only names classes, so it can be built here: megatron-core defines its TE wrapper classes (on a stand-in
base) even when TE is absent, and its ``TESpecProvider`` imports. What cannot run here (TE's kernels) is covered by
tests/gpu. Checked: the spec functions accept our arguments (megatron-core 0.16.1's real signatures), the attention
mask types (LLM causal, encoders and DiT without mask; the DiT asks for ``padding`` at run time), which norm ends the
LLM decoder, and that the constructor arguments our own modules give TE's linears bind to their signatures.
"""
import ast
import inspect
from pathlib import Path

import pytest
from megatron.core.extensions import transformer_engine as mte
from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.enums import AttnMaskType

import megatron_puffin.distributed as mpd
from megatron_puffin.models.sequence_parallel import LocalNorm


@pytest.fixture()
def te_spec_provider(monkeypatch):
    """megatron-core's gpt_layer_specs imports TESpecProvider only when TE imports: give it the real class, and the
    TE version the spec is built for (its choices depend on it; 2.8 as on current NGC PyTorch containers)."""
    from megatron.core import utils
    from packaging.version import Version

    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", TESpecProvider, raising=False)
    monkeypatch.setattr(utils, "_te_version", Version("2.8.0"))


def test_llm_te_layer_spec_uses_the_real_signature_and_causal_fused_attention(te_spec_provider):
    from megatron_puffin.models.llm.llm_layer_specs import llm_transformer_engine_layer_spec

    spec = llm_transformer_engine_layer_spec()
    attention = spec.submodules.self_attention
    assert attention.params["attn_mask_type"] == AttnMaskType.causal  # exact for right-padded rows
    assert attention.submodules.core_attention is mte.TEDotProductAttention
    assert attention.submodules.linear_qkv is mte.TELayerNormColumnParallelLinear  # RMSNorm fused, from the config
    assert spec.submodules.mlp.submodules.linear_fc1 is mte.TELayerNormColumnParallelLinear
    # The call that used to crash: megatron-core 0.16.1 has no `normalization` argument.
    with pytest.raises(TypeError):
        inspect.signature(gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec).bind(normalization="RMSNorm")


@pytest.fixture()
def single_process():
    mpd.initialize(seed=0)
    yield
    mpd.destroy()


def test_llm_decoder_block_ends_with_the_implementations_norm(te_spec_provider, single_process):
    """megatron-core alone would pick TENorm for the final norm whenever TE imports, whatever the layer spec."""
    from helpers.llm import tiny_llm_config
    from megatron_puffin.models.llm.llm_layer_specs import get_llm_decoder_block_spec, llm_transformer_engine_layer_spec

    transformer_config = tiny_llm_config().to_transformer_config()
    local = get_llm_decoder_block_spec(transformer_config, "local")
    assert local.layer_norm is LocalNorm and len(local.layer_specs) == 4
    te = get_llm_decoder_block_spec(transformer_config, "transformer_engine", llm_transformer_engine_layer_spec())
    assert te.layer_norm is mte.TENorm and len(te.layer_specs) == 4


def test_encoder_and_dit_te_specs_name_te_classes_and_unmasked_attention():
    from megatron_puffin.models.dit.dit_layer_specs import dit_transformer_engine_layer_spec
    from megatron_puffin.models.common.encoder_layer_specs import encoder_transformer_engine_layer_spec

    encoder = encoder_transformer_engine_layer_spec()
    assert encoder.submodules.self_attention.params["attn_mask_type"] == AttnMaskType.no_mask
    assert encoder.submodules.self_attention.submodules.core_attention is mte.TEDotProductAttention
    assert encoder.submodules.input_layernorm is mte.TENorm and encoder.submodules.pre_mlp_layernorm is mte.TENorm
    dit = dit_transformer_engine_layer_spec()
    attention = dit.submodules.attention.submodules
    assert attention.core_attention is mte.TEDotProductAttention
    assert attention.linear_qkv is mte.TEColumnParallelLinear and attention.linear_proj is mte.TERowParallelLinear


def _te_wrapper_parameters(class_name: str, method: str = "__init__"):
    """(parameter names, required names) of a megatron-core TE wrapper method, read from its source: without TE
    the wrappers are built on a stand-in base and carry no real signature."""
    tree = ast.parse(Path(mte.__file__).read_text())
    cls = next(node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name == class_name)
    func = next(node for node in cls.body if isinstance(node, ast.FunctionDef) and node.name == method)
    positional = func.args.posonlyargs + func.args.args
    required = [a.arg for a in positional[: len(positional) - len(func.args.defaults)]]
    required += [a.arg for a, d in zip(func.args.kwonlyargs, func.args.kw_defaults) if d is None]
    return {a.arg for a in positional + func.args.kwonlyargs} - {"self", "cls"}, set(required) - {"self", "cls"}


def _assert_binds(class_name: str, given: set, method: str = "__init__"):
    names, required = _te_wrapper_parameters(class_name, method)
    assert given <= names, f"{class_name}.{method} has no {sorted(given - names)}"
    assert required <= given, f"{class_name}.{method} needs {sorted(required - given)}"


def test_our_modules_call_te_classes_with_arguments_their_signatures_accept():
    """JointAttention / FeedForward build their linears through ``_column`` / ``_row`` and call the core attention
    with ``attn_mask_type``: bind those keyword sets against megatron-core 0.16.1's TE wrappers (a wrong keyword
    would otherwise fail only at GPU build time)."""
    from megatron_puffin.models.dit import attention as dit_attention

    source = inspect.getsource(dit_attention.JointAttention._column) + inspect.getsource(dit_attention.JointAttention._row)
    assert "gather_output=False" in source and "input_is_parallel=True" in source
    common = {"input_size", "output_size", "config", "init_method", "bias", "skip_bias_add", "is_expert",
              "tp_comm_buffer_name"}
    _assert_binds("TEColumnParallelLinear", common | {"gather_output"})
    _assert_binds("TERowParallelLinear", common | {"input_is_parallel"})
    _assert_binds("TEDotProductAttention", {"config", "layer_number", "attn_mask_type", "attention_type"})
    _assert_binds("TEDotProductAttention", {"query", "key", "value", "attention_mask", "attn_mask_type"}, "forward")
    _assert_binds("TENorm", {"config", "hidden_size", "eps"}, "__new__")
    with pytest.raises(AssertionError, match="has no"):  # the check itself sees a wrong keyword
        _assert_binds("TERowParallelLinear", common | {"gather_output"})
