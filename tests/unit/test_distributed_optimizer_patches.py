"""The two DistributedOptimizer fixes of megatron_puffin.platform (megatron-core 0.16.1 bugs, not CPU patches): each
shows megatron-core's own code path with the fix on is right, and with it off is still wrong, so a fix that a newer
megatron-core makes unnecessary is noticed."""
import pytest
import torch

import megatron_puffin.distributed as mpd
from megatron_puffin import platform


@pytest.fixture(scope="module")
def trained_optimizer():
    """A one-layer LLM (untied output layer of 251 x 96 values, not a multiple of the 128-value bucket padding)
    under megatron-core's DDP with the distributed optimizer, six gradient buckets, after one Adam step."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from helpers.llm import tiny_llm_config
    from megatron_puffin.models.llm import build_llm

    mpd.initialize(seed=5)
    config = tiny_llm_config(num_layers=1, vocab_size=251, tied=False)
    tconfig = config.to_transformer_config(params_dtype=torch.float32)
    model = build_llm(config, transformer_config=tconfig, pg_collection=mpd.process_groups())
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=True,
                                               bucket_size=2000)
    ddp = DistributedDataParallel(tconfig, ddp_config, model)
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=True),
                                       [ddp])
    [sub] = optimizer.chained_optimizers
    generator = torch.Generator().manual_seed(0)
    for param in ddp.parameters():
        param.main_grad.copy_(torch.randn(param.main_grad.shape, generator=generator))
    optimizer.step()
    yield sub, model.sharded_state_dict()
    mpd.destroy()


def _saved_state(optimizer, model_sharded_state_dict):
    """What the ``fully_reshardable`` format saves per parameter: {model param: {key: tensor}}."""
    saved = optimizer.sharded_param_state_fully_reshardable(model_sharded_state_dict, is_loading=False, metadata={})
    params = list(optimizer.buffers[0].param_index_map)
    return {params[index]: {key: sharded.data for key, sharded in tensors.items()} for index, tensors in saved.items()}


def _wrong_parameters(optimizer, saved) -> int:
    wrong = 0
    for param, tensors in saved.items():
        actual = optimizer._get_main_param_and_optimizer_states(param)
        wrong += not all(torch.equal(tensors[key].flatten(), actual[key].flatten())
                         for key in ("param", "exp_avg", "exp_avg_sq"))
    return wrong


def test_fully_reshardable_save_holds_each_parameters_own_state(trained_optimizer):
    optimizer, model_sharded = trained_optimizer
    buffer = optimizer.buffers[0]
    assert len(buffer.buckets) > 1 and buffer.buckets[0].numel_unpadded % 128 != 0  # padding after bucket 0
    assert _wrong_parameters(optimizer, _saved_state(optimizer, model_sharded)) == 0
    with platform.unpatched("DISTOPT_FULLY_RESHARDABLE_BUCKETS"):  # still needed: megatron-core's offsets are off
        wrong = _wrong_parameters(optimizer, _saved_state(optimizer, model_sharded))
    assert wrong == len(buffer.param_index_map) - 1  # every parameter after the first bucket's one


def test_loading_with_torch_adam_gives_each_state_its_own_step(trained_optimizer):
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    if HAVE_APEX_OR_TE:
        pytest.skip("the fix is for torch's Adam (no Apex / Transformer Engine)")
    optimizer, model_sharded = trained_optimizer
    saved = _saved_state(optimizer, model_sharded)
    state_dict = optimizer.state_dict()
    state_dict["param_state_sharding_type"] = "fully_reshardable"
    state_dict["param_state"] = {index: {key: tensor.clone() for key, tensor in tensors.items()}
                                 for index, tensors in enumerate(saved.values())}
    with platform.unpatched("DISTOPT_TORCH_ADAM_STEP"):  # still needed: megatron-core copies a 'step' not saved
        with pytest.raises(KeyError, match="step"):
            optimizer.load_state_dict(state_dict)
    optimizer.load_state_dict(state_dict)
    steps = [state["step"] for state in optimizer.optimizer.state.values()]
    assert len({id(step) for step in steps}) == len(steps) == len(saved)  # no step shared between parameters
    assert all(float(step) == 1.0 for step in steps)
    assert _wrong_parameters(optimizer, saved) == 0  # moments and fp32 main weights restored
