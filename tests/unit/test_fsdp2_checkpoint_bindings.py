"""The two FSDP2 checkpoint rows of megatron_puffin.platform reach every megatron-core module that bound the helper
they replace: a module that imports a helper by name keeps its own reference, so one missed module would record
FSDP2 parameters megatron-core's way again. (What the rows do, on and off, with DTensors on 2 ranks:
tests/distributed/test_torch_fsdp2.py.)"""
import sys

from megatron_puffin import platform
from megatron_puffin.training import fsdp2_checkpoint

ROWS = {
    "FSDP2_CHECKPOINT_SHARDS": ("megatron.core.utils", fsdp2_checkpoint.HELPERS),
    "FSDP2_SWIGLU_SHARDS": ("megatron.core.transformer.mlp", ("apply_swiglu_sharded_factory",)),
}


def _megatron_bindings(functions) -> list:
    """``module.attribute`` of every loaded megatron-core module attribute that is one of ``functions``."""
    found = []
    for name, module in list(sys.modules.items()):
        if name.startswith("megatron.core") and module is not None:
            found += [f"{name}.{attr}" for attr, value in list(vars(module).items())
                      if any(value is function for function in functions)]
    return sorted(found)


def test_every_megatron_module_that_bound_a_replaced_helper_holds_the_replacement():
    import megatron.core.models.gpt  # noqa: F401  (the LLM, embeddings, MLPs, MoE layers)
    import megatron_puffin.models.puffin  # noqa: F401  (every tower's megatron-core modules)

    for row, (home, helpers) in ROWS.items():
        module = sys.modules[home]
        with platform.unpatched(row):
            originals = [getattr(module, helper) for helper in helpers]
        replacements = [getattr(module, helper) for helper in helpers]
        assert _megatron_bindings(originals) == [], row  # nobody kept megatron-core's own helper
        bound = _megatron_bindings(replacements)
        assert len(bound) >= 2 and all(name.rsplit(".", 1)[0] in fsdp2_checkpoint.SHARDED_TENSOR_MODULES
                                       + fsdp2_checkpoint.SWIGLU_MODULES for name in bound), bound
