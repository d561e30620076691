"""Forward+backward time per task micro-batch: our composed Puffin vs the same model run the reference's way.

Ours: ``build_puffin`` at TP=1 in one process (``megatron_puffin.distributed.initialize()``). Reference: the same
weights (converted with ``megatron_puffin.convert.puffin.puffin_to_mcore``) in the assembly of
``megatron_puffin.testing.reference_puffin`` (tested by ``tests/parity/test_puffin_reference_parity.py``):
transformers ``Qwen2ForCausalLM`` called with ``inputs_embeds``, the 2-D mask and position ids of the left-padded
batch; plain-PyTorch connectors; diffusers ``AutoencoderKL`` encoding every target image, camera map and initial
view one sample at a time; diffusers SD3 joint blocks with per-latent patch embedding and a dense ``[B, 1, L, L]``
boolean mask given to SDPA in every block (``megatron_puffin.testing.reference_dit``, as ``bench_dit.py``'s
``reference-mask``). The vision tower is OURS in both models (the reference's RADIO needs timm, unavailable on
this CPU setup): it adds the same time to both sides and pulls the image tasks' ratios towards 1.

Micro-batches come from a synthetic Puffin-4M dataset rendered and preprocessed into a temporary directory
(``tools/make_synthetic_dataset.py`` + ``tools/preprocess_data.py``, as ``tests/helpers/puffin.py`` does). Before
timing, both models' losses are checked equal per task (fp32, ``--loss-tolerance`` relative): the reference draws
its posterior noise, noise levels and Gaussian noise from per-sample generators keyed as ours, so both see the same
noise. Each time is the median of ``--repeats`` forward+backward passes after ``--warmup`` passes; the two models
take turns (the first to run alternates). Per task it also prints the paired ratio (the median of the per-turn
ratios, the two passes back to back), a 95 % bootstrap interval of it and its verdict (an interval containing 1.0:
this run cannot tell the two sides apart on that task).

Usage:
    python benchmarks/bench_puffin.py [--micro-batch-size 4] [--image-size 128] [--llm-layers 4] [--llm-hidden 256]
        [--dit-layers 4] [--dit-heads 4] [--connector-layers 2] [--num-queries 64] [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List

warnings.filterwarnings("ignore")

import torch  # noqa: E402
# puffin_bench_common (next to this script) comes first: importing it puts tests/ on sys.path for helpers.
from puffin_bench_common import (  # noqa: E402
    activation_bytes,
    add_common_run_args,
    add_data_and_model_args,
    make_dataset,
    PAIRED_HEADER,
    model_loss,
    paired_columns,
    resolve_sizes,
)

import megatron_puffin.distributed as mpd  # noqa: E402
from helpers.puffin import TASK_STREAMS, task_batches  # noqa: E402
from megatron_puffin.testing.reference_puffin import build_puffin_pair  # noqa: E402
from megatron_puffin.platform import setup  # noqa: E402
from megatron_puffin.training.objectives import puffin_loss  # noqa: E402
from bench_flags import lever_list, nonnegative_int, positive_int, run_main  # noqa: E402


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_and_model_args(parser)
    group = parser.add_argument_group("run")
    group.add_argument("--repeats", type=positive_int, default=5)
    group.add_argument("--warmup", type=nonnegative_int, default=1)
    add_common_run_args(group, loss_tolerance=1e-5, loss_tolerance_help="max relative loss difference (fp32)")
    group.add_argument("--levers", type=lever_list(("compile",)), default=None,
                       help="speed levers of ours: compile, all or none (default: all with --real-proportions, "
                            "none otherwise; cached latents and the host malloc cache are the training loop's: "
                            "bench_training.py)")
    args = parser.parse_args()
    resolve_sizes(args)
    if args.levers is None:
        args.levers = ["compile"] if args.real_proportions else []
    return args


def _config(args, paths: Dict[str, str]):
    from megatron_puffin.data import PuffinTokenizer
    from megatron_puffin.diffusion import FlowMatchingConfig
    from megatron_puffin.models.connector import ConnectorConfig
    from megatron_puffin.models.dit import DiTConfig
    from megatron_puffin.models.llm import LLMConfig
    from megatron_puffin.models.puffin import PuffinConfig
    from megatron_puffin.models.puffin_config import PuffinModelConfig
    from megatron_puffin.models.vision import VisionConfig

    tokenizer = PuffinTokenizer(paths["tokenizer"])
    llm = LLMConfig(num_layers=args.llm_layers, hidden_size=args.llm_hidden, ffn_hidden_size=args.llm_ffn,
                    num_attention_heads=args.llm_heads, num_query_groups=args.llm_kv_heads,
                    vocab_size=max(tokenizer.vocab_size, args.llm_vocab or 0), max_position_embeddings=4096)
    vision = VisionConfig(hidden_size=args.vision_hidden, num_layers=args.vision_layers,
                          num_attention_heads=args.vision_heads, ffn_hidden_size=args.vision_ffn,
                          max_image_size=args.image_size)
    connector = ConnectorConfig(num_queries=args.num_queries, hidden_size=args.connector_hidden,
                                num_layers=args.connector_layers, num_attention_heads=args.connector_heads,
                                ffn_hidden_size=args.connector_ffn, pooled_projection_dim=args.connector_pooled,
                                joint_attention_dim=args.connector_joint)
    latent = args.image_size // 8
    dit = DiTConfig(sample_size=latent, num_layers=args.dit_layers, attention_head_dim=args.dit_head_dim,
                    num_attention_heads=args.dit_heads, joint_attention_dim=args.connector_joint,
                    caption_projection_dim=args.dit_caption, pooled_projection_dim=args.connector_pooled,
                    pos_embed_max_size=max(16, latent))
    model = PuffinModelConfig(vae_config=paths["vae_config"], image_pad_token_id=tokenizer.image_pad_id)
    return PuffinConfig(llm=llm, vision=vision, connector=connector, dit=dit, flow=FlowMatchingConfig(), model=model,
                        seed=args.seed)


def _check_losses(ours, reference, batches, tolerance: float) -> Dict[str, tuple]:
    """Both models' loss per task (no grad); raises if any pair differs by more than ``tolerance`` relative."""
    losses, failures = {}, []
    with torch.no_grad():
        for task, batch in batches.items():
            pair = (puffin_loss(ours, batch).loss.item(), reference(batch)["loss"].item())
            losses[task] = pair
            if abs(pair[0] - pair[1]) > tolerance * abs(pair[1]):
                failures.append(f"{task}: ours {pair[0]:.7g} vs reference {pair[1]:.7g}")
    if failures:
        raise RuntimeError(f"losses differ beyond {tolerance:g} relative: " + "; ".join(failures))
    return losses


def _step(model, batch) -> float:
    model.zero_grad(set_to_none=True)
    _synchronize()
    start = time.perf_counter()
    model_loss(model, batch).backward()
    _synchronize()
    return time.perf_counter() - start


def _synchronize() -> None:
    if torch.cuda.is_available():  # both models run on the current CUDA device when there is one
        torch.cuda.synchronize()


def _time(models: Dict[str, torch.nn.Module], batch, repeats: int, warmup: int) -> Dict[str, List[float]]:
    """Fwd+bwd seconds of each turn per model; the models take turns, the first alternating between turns."""
    for _ in range(warmup):
        for model in models.values():
            _step(model, batch)
    times: Dict[str, List[float]] = {name: [] for name in models}
    order = list(models)
    for turn in range(repeats):
        for name in (order if turn % 2 == 0 else order[::-1]):
            times[name].append(_step(models[name], batch))
    return times


def _report(args, config, batches, losses, times) -> float:
    """The per-task table (``times``: per task, each side's per-turn seconds); returns the geometric mean ratio."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"Puffin fwd+bwd per task micro-batch, {device} fp32, threads={torch.get_num_threads()}, "
          f"micro-batch {args.micro_batch_size}, images {args.image_size}^2; LLM {config.llm.num_layers} layers "
          f"hidden {config.llm.hidden_size}, vision {config.vision.num_layers} layers hidden "
          f"{config.vision.hidden_size}, {config.connector.num_queries} queries, connectors "
          f"{config.connector.num_layers} layers, DiT {config.dit.num_layers} blocks hidden {config.dit.hidden_size}; "
          f"Qwen2 attention {args.hf_attn}")
    print("vision tower: ours in both models (timm RADIO unavailable on CPU); it adds the same time to both sides")
    print(f"{'task':22s} {'seq':>5s} {'loss':>9s} {'rel diff':>9s} {'ours ms':>9s} {'reference ms':>13s} {'ratio':>7s} "
          f"{PAIRED_HEADER}")
    ratios = []
    for task, sides in times.items():
        ours_s, ref_s = statistics.median(sides["ours"]), statistics.median(sides["reference"])
        ratios.append(ref_s / ours_s)
        paired = [ref / ours for ours, ref in zip(sides["ours"], sides["reference"])]
        ours_loss, ref_loss = losses[task]
        print(f"{task:22s} {batches[task]['input_ids'].shape[1]:5d} {ours_loss:9.5f} "
              f"{abs(ours_loss - ref_loss) / abs(ref_loss):9.1e} {1e3 * ours_s:9.1f} {1e3 * ref_s:13.1f} "
              f"{ratios[-1]:7.3f} {paired_columns(paired)}")
    geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(f"ratio = reference / ours (> 1: ours faster) of the medians; paired: the median of the per-turn ratios, its "
          f"95 % interval and what that says; losses equal within {args.loss_tolerance:g} relative; geometric mean "
          f"ratio over {len(ratios)} tasks: {geomean:.3f}")
    return geomean


def main() -> None:
    args = _parse_args()
    logging.basicConfig(level=logging.WARNING)
    setup()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_puffin_") as tmp:
        # The share table (--real-proportions) reads the VAE config written here: keep the directory to the end.
        paths = make_dataset(Path(tmp), args)
        mpd.initialize(seed=args.seed)
        loaded = task_batches(paths, micro_batch_size=args.micro_batch_size, seed=args.seed,
                              image_size=args.image_size, num_queries=args.num_queries)
        config = _config(args, paths)
        ours, reference = build_puffin_pair(config, seed=args.seed, attn_implementation=args.hf_attn)
        batches = {task: loaded[task][0] for task in TASK_STREAMS}
        if "compile" in args.levers:
            from megatron_puffin.models.compile import compile_model

            compile_model(ours)
        losses = _check_losses(ours, reference, batches, args.loss_tolerance)
        times = {task: _time({"ours": ours, "reference": reference}, batch, args.repeats, args.warmup)
                 for task, batch in batches.items()}
        geomean = _report(args, config, batches, losses, times)
        import real_proportions

        preset = real_proportions.describe_preset(args)
        if preset:
            print(preset)
        if args.real_proportions:
            from megatron_puffin.training.towers import trainable_towers

            for line in real_proportions.share_table(config, list(batches.values()), trainable_towers(config.model)):
                print(line)
        memory = {name: activation_bytes(model, batches.values()) for name, model in (("ours", ours),
                                                                                       ("reference", reference))}
        print(f"activation memory (distinct storages saved for backward, largest task): ours "
              f"{memory['ours'] / 2**20:.1f} MiB, reference {memory['reference'] / 2**20:.1f} MiB "
              f"({memory['ours'] / memory['reference']:.2f}x)")
        print(f"levers of ours: {', '.join(args.levers) or 'none'}; threads {torch.get_num_threads()}")
        print(f"overall ours/reference: {geomean:.2f}")
        mpd.destroy()


if __name__ == "__main__":
    run_main(main)
