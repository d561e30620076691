"""Loading a checkpoint for inference: the model shape from the checkpoint's flags, overrides, and one-line errors
for a missing checkpoint, another model shape, an impossible TP size or a missing tokenizer."""
import pytest
import torch

import megatron_puffin.distributed as mpd
from helpers.inference import build_tiny_model, save_model_checkpoint
from helpers.puffin import make_tiny_dataset
from megatron_puffin.inference import InferenceSetupError, load_puffin, understand


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    paths = make_tiny_dataset(root, num_samples=4)
    mpd.initialize(seed=0)
    model, args = build_tiny_model(paths)
    save_model_checkpoint(model, args, root / "run" / "iter_0000003", iteration=3)
    from megatron_puffin.checkpointing import save_checkpoint

    # the LLM tower alone, as hf-to-mcore writes it (for --llm-checkpoint)
    save_checkpoint(model.llm.sharded_state_dict(), str(root / "llm_only"), metadata={"kind": "llm"})
    yield root, paths, model
    mpd.destroy()


def _weights(model):
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def test_a_run_directory_loads_its_latest_checkpoint_with_the_stored_shape(setup):
    root, _, model = setup
    loaded = load_puffin(str(root / "run"), need_vae=False)
    assert loaded.checkpoint.endswith("iter_0000003") and list(loaded.towers) == ["llm", "vision", "queries", "dit"]
    ours, theirs = _weights(model), _weights(loaded.model)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert loaded.model.vae is None and not loaded.model.training
    assert loaded.encoder_config.image_max_size == 96 and loaded.encoder_config.num_query_tokens == 4
    image = [torch.rand(3, 96, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1]
    expected = understand(model, loaded.tokenizer, image, max_new_tokens=4)[0].token_ids
    assert understand(loaded.model, loaded.tokenizer, image, max_new_tokens=4)[0].token_ids == expected


@pytest.mark.parametrize("where, flags, message", [
    ("missing", (), "no such file or directory"),
    ("empty", (), "no complete checkpoint there"),
    ("run", ("--hidden-size", "64", "--ffn-hidden-size", "96"), "does not fit the model shape"),
    ("run", ("--tensor-model-parallel-size", "4"), r"--num-attention-heads \(6\) must be divisible"),
    ("run", ("--tokenizer", "/nonexistent/tokenizer.model"), "--tokenizer /nonexistent/tokenizer.model: not found"),
    ("run", ("--num-layerz", "2"), "unknown flag or argument '--num-layerz'"),
    # was "no tokenizer: the checkpoint stores none", then a shape mismatch once --tokenizer was given
    ("llm_only", (), r"holds the llm tower alone \(tools/convert_checkpoint.py\), not a Puffin model: train from it "
                     r"\(pretrain_puffin.py --llm-checkpoint .*llm_only\)"),
])
def test_bad_inputs_give_one_line_errors(setup, where, flags, message):
    root, _, _ = setup
    (root / "empty").mkdir(exist_ok=True)
    with pytest.raises(InferenceSetupError, match=message) as error:
        load_puffin(str(root / where), flags, need_vae=False)
    assert "\n" not in str(error.value)
