"""Forward+backward time of our LLM tower vs transformers' Qwen2ForCausalLM, same weights, same run.

    python benchmarks/bench_llm.py [--layers 4 --hidden 512 --seq 512 --batch 4 --repeats 5]

Both compute logits over the whole sequence and a token-mean cross-entropy, then backward. Prints median
seconds per step for each and the ratio ours / reference (< 1 means ours is faster).
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
from megatron_puffin.models.llm import LLMConfig, build_llm, shift_labels, vocab_parallel_token_losses  # noqa: E402


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
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"])
    args = parser.parse_args()

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

    def ours_step():
        logits = ours(input_ids=input_ids, position_ids=position_ids, padding_mask=mask)
        target = shift_labels(labels)
        loss = vocab_parallel_token_losses(logits, target).sum() / (target >= 0).sum()
        loss.backward()

    def hf_step():
        out = hf(input_ids=input_ids, attention_mask=mask.long(), position_ids=position_ids, labels=labels)
        out.loss.backward()

    t_ours, t_hf = _time(ours_step, args.repeats), _time(hf_step, args.repeats)
    print(f"config: layers={args.layers} hidden={args.hidden} heads={args.heads}/{args.kv_heads} ffn={args.ffn} "
          f"vocab={args.vocab} batch={args.batch} seq={args.seq} threads={torch.get_num_threads()} hf_attn={args.hf_attn}")
    print(f"ours (megatron-core local spec): {t_ours * 1e3:8.1f} ms / fwd+bwd")
    print(f"transformers Qwen2             : {t_hf * 1e3:8.1f} ms / fwd+bwd")
    print(f"ratio ours/reference           : {t_ours / t_hf:.3f}")
    mpd.destroy()


if __name__ == "__main__":
    main()
