"""The output layer on the supervised positions only vs on every position (the understanding loss before), same
process, same LLM, same hidden states and targets.

Both variants run the LLM tower (``build_llm``, local spec, fp32, TP=1) forward and backward on one micro-batch
and the token-mean cross-entropy of the supervised positions: "all positions" applies the output layer and
megatron-core's vocab-parallel cross-entropy to the whole ``[s, b]`` grid and masks; "supervised rows" gathers
the supervised rows first (``PuffinModel.supervised_logits``). The losses are checked equal (1e-6 relative).
The variants take turns ``--repeats`` times; the medians are reported. Defaults: the real-proportion LLM
(``real_proportions.py``: 7 layers x 192, vocabulary 4,748) on image2text's shape at real proportions.

Usage:
    python benchmarks/bench_output_layer.py [--seq-length 379] [--supervised 40] [--batch-size 1] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

warnings.filterwarnings("ignore")

import torch  # noqa: E402

import real_proportions  # noqa: E402
from megatron_puffin.platform import setup  # noqa: E402
from bench_flags import positive_int, run_main  # noqa: E402


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-length", type=positive_int, default=379,
                        help="positions per row (image2text: 256 image tokens + prompt + answer)")
    parser.add_argument("--supervised", type=positive_int, default=40, help="supervised (answer) positions per row")
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--threads", type=positive_int, default=1)
    return parser.parse_args()


def _llm():
    from megatron_puffin.distributed import process_groups as mpd_process_groups
    from megatron_puffin.models.llm import LLMConfig, build_llm

    sizes = real_proportions.scaled_sizes()
    config = LLMConfig(num_layers=sizes["llm_layers"], hidden_size=sizes["llm_hidden"],
                       ffn_hidden_size=sizes["llm_ffn"], num_attention_heads=sizes["llm_heads"],
                       num_query_groups=sizes["llm_kv_heads"], vocab_size=sizes["llm_vocab"])
    torch.manual_seed(0)
    return build_llm(config, pg_collection=mpd_process_groups()).train()


def _loss(llm, inputs, positions, target, supervised_rows: bool) -> torch.Tensor:
    from megatron_puffin.models.llm import vocab_parallel_token_losses

    hidden = llm(decoder_input=inputs, position_ids=positions, output="hidden")
    if supervised_rows:
        mask = target >= 0
        rows = hidden.transpose(0, 1)[mask]
        losses = vocab_parallel_token_losses(llm.compute_logits(rows[:, None]), target[mask][None])
    else:
        losses = vocab_parallel_token_losses(llm.compute_logits(hidden), target)
    return losses.sum() / (target >= 0).sum()


def main() -> None:
    import megatron_puffin.distributed as mpd

    args = _parse_args()
    setup()
    torch.set_num_threads(args.threads)
    mpd.initialize(seed=0)
    llm = _llm()
    b, s, h = args.batch_size, args.seq_length, llm.config.hidden_size
    inputs = torch.randn(s, b, h, requires_grad=True)
    positions = torch.arange(s).expand(b, s)
    target = torch.full((b, s), -100, dtype=torch.long)
    target[:, s - args.supervised - 1:s - 1] = torch.randint(0, llm.llm_config.vocab_size, (b, args.supervised))
    losses = {rows: _loss(llm, inputs, positions, target, rows).item() for rows in (False, True)}
    if abs(losses[True] - losses[False]) > 1e-6 * abs(losses[False]):
        raise RuntimeError(f"losses differ: supervised rows {losses[True]!r}, all positions {losses[False]!r}")
    times = {False: [], True: []}
    for repeat in range(args.repeats):
        for rows in ((False, True) if repeat % 2 == 0 else (True, False)):
            start = time.perf_counter()
            _loss(llm, inputs, positions, target, rows).backward()
            times[rows].append(time.perf_counter() - start)
            llm.zero_grad(set_to_none=True)
    mpd.destroy()
    before, after = statistics.median(times[False]), statistics.median(times[True])
    print(f"LLM {llm.config.num_layers} x {h}, vocab {llm.llm_config.vocab_size}, batch {b} x {s} positions, "
          f"{args.supervised} supervised per row; fp32, {torch.get_num_threads()} thread(s); median of "
          f"{args.repeats}, variants taking turns; losses equal within 1e-6")
    print(f"fwd+bwd all positions {before * 1e3:.1f} ms, supervised rows {after * 1e3:.1f} ms")
    print(f"speed-up supervised rows / all positions: {before / after:.2f}")


if __name__ == "__main__":
    run_main(main)
