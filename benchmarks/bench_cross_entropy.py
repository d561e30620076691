"""The LLM's token cross-entropy at tensor-parallel size 1, forward + backward, same process, same logits.

Four variants on one ``[rows, 1, vocab]`` fp32 logit tensor (the supervised rows the output layer produces):

* ``megatron-core``: ``tensor_parallel.vocab_parallel_cross_entropy`` with its tensor-parallel group of one rank
  (three ``all_reduce`` calls over that group);
* ``helpers, torch.max``: ours' single-rank function (megatron-core's ``VocabParallelCrossEntropy`` helpers
  without the collectives) with the maximum taken as ``calculate_logits_max`` takes it (``torch.max(dim=-1)``,
  which also computes argmax indices): ours before the maximum changed;
* ``ours``: ``vocab_parallel_token_losses`` with the group of one rank (the same helpers, the maximum with
  ``torch.amax``), what training runs;
* ``F.cross_entropy``: the reference's loss (``log_softmax`` + NLL, a different but equal-within-rounding form).

Ours is checked bit-identical to megatron-core (losses and logit gradients), ``F.cross_entropy`` within 1e-5. The
variants take turns ``--repeats`` times; the medians and their ratios to megatron-core are printed. Defaults:
text2text's supervised rows at real proportions (micro-batch 2) and the real-proportion vocabulary.

Usage:
    python benchmarks/bench_cross_entropy.py [--rows 327] [--vocab 4748] [--repeats 51] [--threads 1]
        [--host-malloc-cache]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from typing import Callable, Dict, Tuple

warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import real_proportions  # noqa: E402
from megatron_puffin.platform import setup  # noqa: E402
from bench_flags import positive_int, run_main  # noqa: E402


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=positive_int, default=327,
                        help="supervised positions in the micro-batch (text2text at real proportions: 327)")
    parser.add_argument("--vocab", type=positive_int, default=real_proportions.scaled_sizes()["llm_vocab"])
    parser.add_argument("--repeats", type=positive_int, default=51)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--host-malloc-cache", action="store_true",
                        help="keep freed host memory for reuse (training's lever of that name): without it glibc "
                             "maps and zero-fills every fresh logit-sized buffer, which the variants allocating "
                             "new ones (F.cross_entropy) pay on every call")
    return parser.parse_args()


def _torch_max(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """megatron-core's ``calculate_logits_max``: ``torch.max`` (values and argmax indices), the values kept."""
    return torch.max(logits, dim=dim)[0]


def _variants(tp_group) -> Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """name -> ``[rows, 1, V]`` logits, ``[1, rows]`` labels -> ``[1, rows]`` losses."""
    from megatron.core import tensor_parallel

    from megatron_puffin.models.llm import vocab_parallel_token_losses
    from megatron_puffin.models.llm.model import _SingleRankCrossEntropy

    def cross_entropy(logits, labels):
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1), reduction="none")[None]

    return {
        "megatron-core": lambda logits, labels: tensor_parallel.vocab_parallel_cross_entropy(
            logits, labels.transpose(0, 1).contiguous()).transpose(0, 1),
        "helpers, torch.max": lambda logits, labels: _SingleRankCrossEntropy.apply(
            logits, labels.transpose(0, 1).contiguous(), _torch_max).transpose(0, 1),
        "ours": lambda logits, labels: vocab_parallel_token_losses(logits, labels, tp_group=tp_group),
        "F.cross_entropy": cross_entropy,
    }


def _run(fn, values: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """(losses, logit gradient, seconds) of one forward + backward on a fresh leaf (the helpers work in place)."""
    logits = values.clone().requires_grad_()
    start = time.perf_counter()
    losses = fn(logits, labels)
    losses.sum().backward()
    return losses.detach(), logits.grad, time.perf_counter() - start


def main() -> None:
    import megatron_puffin.distributed as mpd

    args = _parse_args()
    setup()
    torch.set_num_threads(args.threads)
    if args.host_malloc_cache:
        from megatron_puffin.training.host_memory import retain_freed_memory

        retain_freed_memory()
    mpd.initialize(seed=0)
    generator = torch.Generator().manual_seed(0)
    values = 3 * torch.randn(args.rows, 1, args.vocab, generator=generator)
    labels = torch.randint(0, args.vocab, (1, args.rows), generator=generator)
    variants = _variants(mpd.process_groups().tp)
    results = {name: _run(fn, values, labels) for name, fn in variants.items()}
    base_losses, base_grad, _ = results["megatron-core"]
    for name in ("helpers, torch.max", "ours"):
        if not (torch.equal(results[name][0], base_losses) and torch.equal(results[name][1], base_grad)):
            raise RuntimeError(f"{name} is not bit-identical to megatron-core's vocab_parallel_cross_entropy")
    torch.testing.assert_close(results["F.cross_entropy"][0], base_losses, rtol=1e-5, atol=1e-5)
    times = {name: [] for name in variants}
    for repeat in range(args.repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for name in order:
            times[name].append(_run(variants[name], values, labels)[2])
    mpd.destroy()
    medians = {name: statistics.median(values) for name, values in times.items()}
    malloc = "on" if args.host_malloc_cache else "off"
    print(f"cross-entropy fwd+bwd, {args.rows} rows x vocabulary {args.vocab}, fp32, {torch.get_num_threads()} "
          f"thread(s), host-malloc-cache {malloc}, median of {args.repeats} (variants taking turns); ours and the "
          f"helpers bit-identical to megatron-core, F.cross_entropy within 1e-5")
    for name, seconds in medians.items():
        print(f"  {name:20s} {seconds * 1e3:7.3f} ms   megatron-core / this {medians['megatron-core'] / seconds:5.2f}")


if __name__ == "__main__":
    run_main(main)
