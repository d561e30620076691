"""Inference at TP=2 equals TP=1, a checkpoint saved with PP=2 loads for inference at TP=1 and TP=2, and greedy
decoding runs on the PP=2 layout itself, with the KV cache or recomputing, every step's logits on both stages
(one spawned group of two gloo ranks): understanding tokens identical, one CFG velocity within 1e-5, generated images
within one uint8 level. The same group checks how the tools deal batches to two data-parallel replicas."""
import torch

from helpers.multiprocess import run_distributed
from helpers.puffin import make_tiny_dataset

VELOCITY_TOLERANCE = 1e-5  # fp32, absolute
IMAGE_LEVELS = 1  # uint8 levels: TP changes reduction order, the decoded image may round the other way
NEW_TOKENS = 5
LOGIT_TOLERANCE = 1e-5  # fp32, absolute


def _images():
    generator = torch.Generator().manual_seed(0)
    return [torch.rand(3, 96, 96, generator=generator) * 2 - 1 for _ in range(2)]


def _understanding_tokens(model, tokenizer):
    from megatron_puffin.inference import understand

    return [o.token_ids for o in understand(model, tokenizer, _images(), max_new_tokens=NEW_TOKENS)]


def _decoded(model, tokenizer, use_kv_cache=True):
    """Greedy tokens and every step's logits of two left-padded understanding prompts."""
    from megatron_puffin.data import templates
    from megatron_puffin.data.task_encoders import TaskEncoder
    from megatron_puffin.inference import greedy_decode
    from megatron_puffin.inference.batching import prompt_batch
    from megatron_puffin.inference.understanding import default_encoder_config

    encoder = TaskEncoder("image2text", tokenizer, default_encoder_config(model))
    prompts = [encoder.understanding_prompt(templates.caption_prompt(i * 4), image)
               for i, image in enumerate(_images())]
    decoded = greedy_decode(model, prompt_batch(prompts, templates.UNDERSTANDING_PAD_ID), -1, NEW_TOKENS,
                            model.puffin_config.llm.vocab_size, use_kv_cache=use_kv_cache, keep_logits=True)
    return decoded.tokens, [step.cpu() for step in decoded.logits]


def _infer(model, tokenizer):
    """Understanding tokens, one guided velocity and a 2-step image from fixed inputs."""
    from megatron_puffin.camera import Camera
    from megatron_puffin.diffusion import FlowMatchEulerSampler
    from megatron_puffin.inference import GenerationRequest, GenerationSettings, generate, prepare_generation

    images = _images()
    tokens = _understanding_tokens(model, tokenizer)
    requests = [GenerationRequest(Camera(0.1, -0.2, 1.48, 0.5), "a room", init_image=images[0])]
    settings = GenerationSettings(num_inference_steps=2)
    prepared = prepare_generation(model, tokenizer, requests, settings)
    timestep = model.schedule.inference_schedule(2).timesteps[0]
    with torch.no_grad():
        velocity = FlowMatchEulerSampler(model.schedule, 2, 4.5).guided_velocity(prepared.velocity_fn, prepared.noise,
                                                                                 timestep)
    image = generate(model, tokenizer, requests, settings)[0].image
    return {"tokens": tokens, "velocity": velocity.cpu(), "image": image}


def _worker(root, paths):
    import megatron_puffin.distributed as mpd
    from helpers.inference import build_tiny_model, save_model_checkpoint
    from megatron_puffin.data import PuffinTokenizer
    from megatron_puffin.inference import load_puffin
    from megatron_puffin.checkpointing import load_module

    from megatron_puffin.inference.cli import ReplicaRounds, is_output_rank

    # the tools open their resume journal before the process group starts: only the launch's rank 0 writes it
    results = {"output_rank_before_init": is_output_rank()}
    mpd.initialize(1, 1, seed=0)  # two data-parallel replicas of the TP=1 model
    results["output_rank"] = is_output_rank()
    rounds = ReplicaRounds([[0, 1], [2], [3, 4], [5], [6]])  # the tools' dealing: one batch per replica per round
    results["dealt"], results["gathered"] = [], []
    for chunk in rounds:
        results["dealt"].append(chunk)
        results["gathered"].append(rounds.gather([(index, f"answer {index}") for index in chunk]))
    model, args = build_tiny_model(paths)
    save_model_checkpoint(model, args, root / "tp1" / "iter_0000001")
    results["reference"] = _infer(model, PuffinTokenizer(paths["tokenizer"]))
    results["reference_logits"] = _decoded(model, PuffinTokenizer(paths["tokenizer"]))
    ctx = mpd.initialize(1, 2, seed=0)  # the same weights as a PP=2 training layout saves them
    stage, _ = build_tiny_model(paths, pre_process=ctx.is_first_pipeline_stage,
                                post_process=ctx.is_last_pipeline_stage)
    load_module(stage, str(root / "tp1" / "iter_0000001"))
    stage.eval()
    # decoding with the PP=2 training layout itself (validation's camera metric): tokens from stage to stage
    results["decoded_at_pp2"] = _understanding_tokens(stage, PuffinTokenizer(paths["tokenizer"]))
    # with every step's logits, by the KV cache and by recomputing the whole sequence each step
    results["logits_at_pp2"] = {cached: _decoded(stage, PuffinTokenizer(paths["tokenizer"]), use_kv_cache=cached)
                                for cached in (True, False)}
    save_model_checkpoint(stage, args, root / "pp2" / "iter_0000001")
    for name, checkpoint, tp in (("tp2", "tp1", 2), ("pp2_at_tp1", "pp2", 1), ("pp2_at_tp2", "pp2", 2)):
        loaded = load_puffin(str(root / checkpoint), tensor_model_parallel_size=tp)
        results[name] = _infer(loaded.model, loaded.tokenizer)
    return results


def test_inference_is_the_same_at_every_layout(tmp_path):
    paths = make_tiny_dataset(tmp_path / "tiny", num_samples=4)
    results = run_distributed(_worker, 2, tmp_path, paths)
    assert [(r["output_rank_before_init"], r["output_rank"]) for r in results] == [(True, True), (False, False)]
    # the batches dealt in turns (the last round has none for the second replica), every result on every rank
    assert [r["dealt"] for r in results] == [[[0, 1], [3, 4], [6]], [[2], [5], []]]
    expected = [[(i, f"answer {i}") for i in indices] for indices in ([0, 1, 2], [3, 4, 5], [6])]
    assert results[0]["gathered"] == results[1]["gathered"] == expected
    reference = results[0]["reference"]
    assert len({tuple(t) for t in reference["tokens"]}) == 2 and reference["image"].float().std() > 0
    tokens, logits = results[0]["reference_logits"]
    assert len(set(tokens.flatten().tolist())) > 3  # varied tokens: positions and the cache matter
    for rank_results in results:  # both stages of the PP=2 layout end with the same tokens
        assert rank_results["decoded_at_pp2"] == reference["tokens"]
        for cached, (got_tokens, got_logits) in rank_results["logits_at_pp2"].items():
            assert torch.equal(got_tokens, tokens), cached
            assert len(got_logits) == len(logits) == NEW_TOKENS
            for step_got, step_expected in zip(got_logits, logits):
                torch.testing.assert_close(step_got, step_expected, atol=LOGIT_TOLERANCE, rtol=0)
        for name in ("reference", "tp2", "pp2_at_tp1", "pp2_at_tp2"):
            got = rank_results[name]
            assert got["tokens"] == reference["tokens"], name
            torch.testing.assert_close(got["velocity"], reference["velocity"], atol=VELOCITY_TOLERANCE, rtol=0)
            difference = (got["image"].int() - reference["image"].int()).abs().max()
            assert difference <= IMAGE_LEVELS, (name, int(difference))
