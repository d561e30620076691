"""Inference speed: greedy decoding with our KV cache vs transformers' ``generate``, and seconds per generated image
vs the reference-style pipeline, on the same weights in one process.

Decode: ``--prompts`` text prompts (the text2text reasoning prompt with captions of different lengths, left padded)
decoded for exactly ``--new-tokens`` tokens. Ours: :func:`megatron_puffin.inference.greedy_decode` (megatron-core's
static KV cache on our LLM tower, and for comparison full recomputation every step). Baseline: the same weights in
transformers' ``Qwen2ForCausalLM`` (``build_puffin_pair`` converts them) and its ``generate`` (greedy, its dynamic
KV cache, ``inputs_embeds``). Both must produce the same tokens (checked). Rate = prompts x new tokens / seconds,
prefill included.

Image: ``--images`` cam2image requests at ``--image-size`` with CFG 4.5 and ``--steps`` Euler steps. Ours:
:func:`megatron_puffin.inference.generate` (batched VAE, our MMDiT). Baseline: the reference-style pipeline of
``megatron_puffin.testing.reference_inference.reference_generate`` on the same weights (HF Qwen2, plain-PyTorch
connectors, per-sample VAE encode/decode, diffusers' scheduler, the reference dynamic MMDiT with its dense mask). The
vision tower is not used (no initial view). Times are medians of ``--repeats`` runs after one warm-up; the sides
take turns.

Usage:
    python benchmarks/bench_inference.py [--prompts 4] [--new-tokens 32] [--images 2] [--steps 10] [--threads 1]
"""
from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

import torch  # noqa: E402
# puffin_bench_common (next to this script) comes first: importing it puts tests/ on sys.path for helpers.
from puffin_bench_common import (  # noqa: E402
    add_common_run_args, add_data_and_model_args, make_dataset, resolve_sizes)
from bench_puffin import _config  # noqa: E402

import megatron_puffin.distributed as mpd  # noqa: E402
from megatron_puffin.testing.reference_puffin import build_puffin_pair  # noqa: E402
from megatron_puffin.platform import setup  # noqa: E402
from bench_flags import positive_int, run_main  # noqa: E402

CAPTIONS = ["A kitchen.", "A narrow street with parked bicycles and shop signs on both sides.",
            "A lake at dusk.", "Two chairs beside a window in a bright room with wooden floors and white walls."]


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_and_model_args(parser)
    group = parser.add_argument_group("run")
    group.add_argument("--prompts", type=positive_int, default=4, help="prompts decoded together")
    group.add_argument("--new-tokens", type=positive_int, default=32, help="tokens decoded per prompt")
    group.add_argument("--images", type=positive_int, default=2, help="images generated together")
    group.add_argument("--steps", type=positive_int, default=10, help="Euler steps per image (Puffin: 50)")
    group.add_argument("--repeats", type=positive_int, default=3)
    add_common_run_args(group, loss_tolerance=0.0, loss_tolerance_help="unused")
    args = parser.parse_args()
    resolve_sizes(args)  # the derived sizes (and a size preset), as bench_puffin.py does
    return args


def _median_times(functions, repeats: int):
    """{name: (median seconds, last result)}; one warm-up each, then the functions take turns (a shared host's load
    then affects every side alike)."""
    for function in functions.values():
        function()
    times = {name: [] for name in functions}
    results = {}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            results[name] = function()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(values), results[name]) for name, values in times.items()}


def _decode_prompts(ours, tokenizer, count: int):
    from megatron_puffin.data import templates
    from megatron_puffin.data.task_encoders import TaskEncoder
    from megatron_puffin.inference.batching import prompt_batch
    from megatron_puffin.inference.understanding import default_encoder_config

    encoder = TaskEncoder("text2text", tokenizer, default_encoder_config(ours))
    samples = [encoder.understanding_prompt(templates.REASONING_PROMPT + " ", None, variable=CAPTIONS[i % 4])
               for i in range(count)]
    return prompt_batch(samples, templates.UNDERSTANDING_PAD_ID)


def bench_decode(args, ours, reference, tokenizer) -> None:
    from megatron_puffin.inference import greedy_decode

    batch = _decode_prompts(ours, tokenizer, args.prompts)
    vocab, n = ours.puffin_config.llm.vocab_size, args.new_tokens

    def ours_cached():
        return greedy_decode(ours, batch, -1, n, vocab).tokens

    def ours_recomputed():
        return greedy_decode(ours, batch, -1, n, vocab, use_kv_cache=False).tokens

    reference.llm.generation_config.eos_token_id = None  # exactly n tokens on both sides, no end-token masking
    reference.llm.generation_config.bos_token_id = None

    def hf_generate():
        embeds = reference.llm.model.embed_tokens(batch["input_ids"])
        out = reference.llm.generate(inputs_embeds=embeds, attention_mask=batch["attention_mask"].long(),
                                     max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                                     pad_token_id=0, eos_token_id=None)
        return out[:, -n:]

    with torch.no_grad():
        results = _median_times({"ours (KV cache)": ours_cached, "transformers generate": hf_generate,
                                 "ours (recompute)": ours_recomputed}, args.repeats)
    same = torch.equal(results["ours (KV cache)"][1], results["transformers generate"][1])
    tokens = args.prompts * n
    base = tokens / results["transformers generate"][0]
    print(f"greedy decoding: {args.prompts} prompts x {n} new tokens (prefill {batch['input_ids'].shape[1]} "
          f"positions, left padded); tokens identical to transformers: {same}")
    for name, (seconds, _) in results.items():
        rate = tokens / seconds
        print(f"  {name:24s} {seconds:8.3f} s  {rate:9.1f} tokens/s  ratio vs transformers {rate / base:6.2f}")


def bench_images(args, ours, reference, tokenizer) -> None:
    from megatron_puffin.camera import Camera, camera_maps, normalize_camera_map
    from megatron_puffin.inference import GenerationRequest, GenerationSettings, generate, prepare_generation
    from megatron_puffin.testing.reference_inference import reference_generate

    cameras = [Camera(0.1 * i, -0.1, 1.0) for i in range(args.images)]
    requests = [GenerationRequest(camera, CAPTIONS[i % 4]) for i, camera in enumerate(cameras)]
    settings = GenerationSettings(num_inference_steps=args.steps, image_size=args.image_size,
                                  batch_size=args.images)
    batch = prepare_generation(ours, tokenizer, requests, settings).batch
    values = torch.tensor([[c.roll, c.pitch, c.vfov] for c in cameras])
    maps = normalize_camera_map(camera_maps(values, args.image_size, args.image_size))
    seeds = [settings.seed + i for i in range(args.images)]
    times = _median_times({
        "ours": lambda: generate(ours, tokenizer, requests, settings),
        "reference": lambda: reference_generate(reference, batch, maps, None, seeds, args.image_size, args.steps,
                                                settings.guidance_scale),
    }, args.repeats)
    ours_s, ref_s = times["ours"][0], times["reference"][0]
    per = args.images
    print(f"image generation: {args.images} x {args.image_size}^2 cam2image, CFG 4.5, {args.steps} steps")
    print(f"  ours                     {ours_s / per:8.3f} s/image")
    print(f"  reference-style pipeline {ref_s / per:8.3f} s/image   ratio reference / ours {ref_s / ours_s:6.2f} "
          "(> 1: ours faster)")


def main() -> None:
    args = _parse_args()
    logging.basicConfig(level=logging.WARNING)
    setup()
    torch.set_num_threads(args.threads)
    from megatron_puffin.data import PuffinTokenizer

    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        paths = make_dataset(Path(tmp), args)
        mpd.initialize(seed=args.seed)
        config = _config(args, paths)
        ours, reference = build_puffin_pair(config, seed=args.seed, attn_implementation=args.hf_attn)
        tokenizer = PuffinTokenizer(paths["tokenizer"])
    ours.eval()
    reference.eval()
    print(f"CPU fp32, threads={torch.get_num_threads()}; LLM {config.llm.num_layers} layers hidden "
          f"{config.llm.hidden_size}, {config.connector.num_queries} queries, DiT {config.dit.num_layers} blocks "
          f"hidden {config.dit.hidden_size}, VAE width {args.vae_width}")
    bench_decode(args, ours, reference, tokenizer)
    bench_images(args, ours, reference, tokenizer)
    mpd.destroy()


if __name__ == "__main__":
    run_main(main)
