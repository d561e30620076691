"""Forward+backward time of our LLM tower vs transformers' Qwen2ForCausalLM, same weights, same run.

    python benchmarks/bench_llm.py [--layers 4 --hidden 512 --seq 512 --batch 4 --repeats 5]

The same left-padded micro-batch (rows of different lengths, as the data pipeline collates them) for all:

- ours, as training runs it: the rows moved to right padding (``RightPadding``, one gather, timed), the decoder
  without a mask (causal SDPA, fused kernels on a GPU);
- ours, the previous layout: left-padded rows with an explicit ``[b, 1, s, s]`` mask (SDPA's math kernel);
- transformers Qwen2 (the reference), left-padded with its attention mask.

Each computes logits over the whole sequence and a token-mean cross-entropy, then backward. Prints the losses (the
three must agree), median seconds per step, and the ratios ours / reference and training layout / previous layout
(< 1 means the first is faster).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

import megatron_puffin.distributed as mpd  # noqa: E402
from helpers.llm import hf_qwen2, left_padded_batch  # noqa: E402
from megatron_puffin.convert.qwen2 import hf_to_mcore, load_llm_state_dict  # noqa: E402
from megatron_puffin.platform import setup  # noqa: E402
from megatron_puffin.models.llm import (  # noqa: E402
    LLMConfig,
    RightPadding,
    build_llm,
    shift_labels,
    vocab_parallel_token_losses,
)
from bench_flags import positive_int, run_main  # noqa: E402


def _time(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=positive_int, default=4)
    parser.add_argument("--hidden", type=positive_int, default=512)
    parser.add_argument("--heads", type=positive_int, default=8)
    parser.add_argument("--kv-heads", type=positive_int, default=2)
    parser.add_argument("--ffn", type=positive_int, default=1408)
    parser.add_argument("--vocab", type=positive_int, default=32000)
    parser.add_argument("--seq", type=positive_int, default=512)
    parser.add_argument("--batch", type=positive_int, default=4)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"])
    args = parser.parse_args()
    setup()

    mpd.initialize(seed=0)
    config = LLMConfig(
        num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_attention_heads=args.heads,
        num_query_groups=args.kv_heads, vocab_size=args.vocab, max_position_embeddings=4096, tie_word_embeddings=True,
    )
    hf = hf_qwen2(config).train()
    hf.config._attn_implementation = args.hf_attn
    ours = build_llm(config, pg_collection=mpd.process_groups()).train()
    load_llm_state_dict(ours, hf_to_mcore(hf.state_dict(), config), config)
    lengths = [args.seq - 7 * i for i in range(args.batch)]
    input_ids, mask, position_ids, labels = left_padded_batch(config.vocab_size, lengths, args.seq)
    # No target for a row's first real token: in the left-padded layout a pad would predict it (not a real loss).
    labels = labels.masked_fill(mask & (position_ids == 0), -100)

    def ours_loss(batch, padding_mask):
        logits = ours(input_ids=batch["input_ids"], position_ids=batch["position_ids"], padding_mask=padding_mask)
        target = shift_labels(batch["labels"])
        return vocab_parallel_token_losses(logits, target).sum() / (target >= 0).sum()

    left = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels}

    def ours_step():  # the layout training uses (PuffinModel moves the rows the same way)
        loss = ours_loss(RightPadding.from_left_padded(mask).apply_to_batch(left), None)
        loss.backward()
        return loss

    def ours_left_step():
        loss = ours_loss(left, mask)
        loss.backward()
        return loss

    def hf_step():
        out = hf(input_ids=input_ids, attention_mask=mask.long(), position_ids=position_ids, labels=labels)
        out.loss.backward()
        return out.loss

    losses = {name: float(step()) for name, step in (("ours", ours_step), ("left", ours_left_step), ("hf", hf_step))}
    t_ours, t_left, t_hf = (_time(step, args.repeats) for step in (ours_step, ours_left_step, hf_step))
    print(f"config: layers={args.layers} hidden={args.hidden} heads={args.heads}/{args.kv_heads} ffn={args.ffn} "
          f"vocab={args.vocab} batch={args.batch} seq={args.seq} lengths={lengths} "
          f"threads={torch.get_num_threads()} hf_attn={args.hf_attn}")
    print(f"loss: ours right-padded {losses['ours']:.6f}, ours left-padded {losses['left']:.6f}, "
          f"transformers {losses['hf']:.6f}")
    print(f"ours, right-padded, no mask (training)  : {t_ours * 1e3:8.1f} ms / fwd+bwd")
    print(f"ours, left-padded, [b,1,s,s] mask (prev.): {t_left * 1e3:8.1f} ms / fwd+bwd")
    print(f"transformers Qwen2, left-padded + mask  : {t_hf * 1e3:8.1f} ms / fwd+bwd")
    print(f"ratio ours (training layout) / reference  : {t_ours / t_hf:.3f}")
    print(f"ratio training layout / previous layout   : {t_ours / t_left:.3f}")
    mpd.destroy()


if __name__ == "__main__":
    run_main(main)
