"""GPU check of the local (pure PyTorch) path in bf16: fused attention really selected, speed and memory at real sizes.

1. SDPA backends. Each core attention of ours (LLM causal GQA without a mask, MMDiT joint attention with a key-padding
   mask at the end, ViT without a mask) runs at real sizes with only the fused backends allowed (flash, memory-
   efficient, cuDNN); "No available kernel" would mean PyTorch fell back to the unfused math kernel. Then the same call
   with only the math kernel: time and peak-memory ratios against it.
2. The LLM tower at Qwen2.5-1.5B size (28 layers), forward + backward in bf16: right-padded rows (causal, no mask:
   the layout training uses) against the previous left-padded layout with an explicit [b, 1, s, s] mask, same
   process, same weights: tokens/s and peak memory, with the ratio.

Run through benchmarks/gpu_check.sh. Prints one line per measurement; exits non-zero if a fused backend is missing.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Dict, Tuple

import torch
from bench_flags import positive_int, run_main
from torch.nn.attention import SDPBackend, sdpa_kernel

FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def _timed(fn: Callable[[], torch.Tensor], repeats: int) -> Tuple[float, float]:
    """(seconds per call, peak GiB above the starting allocation) of fn() + backward."""
    for _ in range(2):
        fn().float().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(repeats):
        fn().float().sum().backward()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats, (torch.cuda.max_memory_allocated() - base) / 2**30


def _attention_cases(batch: int) -> Dict[str, Tuple[Callable, Dict]]:
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_puffin.models.common.attention import SDPADotProductAttention
    from megatron_puffin.models.llm.llm_layer_specs import SDPACausalAttention

    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=1)
    dev, dt = "cuda", torch.bfloat16

    def qkv(seq, heads, kv_heads, dim):
        q = torch.randn(seq, batch, heads, dim, device=dev, dtype=dt, requires_grad=True)
        k = torch.randn(seq, batch, kv_heads, dim, device=dev, dtype=dt, requires_grad=True)
        v = torch.randn(seq, batch, kv_heads, dim, device=dev, dtype=dt, requires_grad=True)
        return q, k, v

    llm = SDPACausalAttention(config, layer_number=1)
    dit = SDPADotProductAttention(config, layer_number=1)
    llm_in = qkv(1024, 12, 2, 128)  # Qwen2.5-1.5B: 12 query heads, 2 KV heads, head 128
    dit_in = qkv(64 + 1024, 24, 24, 64)  # SD3-medium: 24 heads of 64; 64 query tokens + a 512^2 image
    joint_lengths = torch.full((batch,), 64 + 1024, device=dev)
    joint_lengths[0] = 64 + 768  # one smaller image: key padding at the end of its row
    mask = (torch.arange(64 + 1024, device=dev)[None, :] >= joint_lengths[:, None])[:, None, None, :]
    vit_in = qkv(1 + 4 + 1024, 16, 16, 80)  # C-RADIOv3-H-like: 16 heads of 80, 512^2 image at patch 16
    return {
        "llm causal GQA, no mask": (lambda: llm(*llm_in, None), {}),
        "dit joint, key padding at the end": (lambda: dit(*dit_in, mask), {}),
        "vit, no mask": (lambda: dit(*vit_in, None), {}),
    }


def check_sdpa_backends(batch: int, repeats: int) -> bool:
    ok = True
    for name, (fn, _) in _attention_cases(batch).items():
        try:
            with sdpa_kernel(FUSED):
                fused_time, fused_mem = _timed(fn, repeats)
        except RuntimeError as exc:
            print(f"FAIL sdpa [{name}]: no fused kernel serves it ({str(exc).splitlines()[0]})")
            ok = False
            continue
        with sdpa_kernel([SDPBackend.MATH]):
            math_time, math_mem = _timed(fn, repeats)
        print(f"ok   sdpa [{name}]: fused {fused_time * 1e3:.2f} ms, {fused_mem:.2f} GiB; math {math_time * 1e3:.2f} ms, "
              f"{math_mem:.2f} GiB; speed-up x{math_time / fused_time:.2f}, memory x{math_mem / max(fused_mem, 1e-9):.2f}")
    return ok


def check_llm_layouts(batch: int, seq: int, layers: int, repeats: int) -> None:
    import megatron_puffin.distributed as mpd
    from megatron_puffin.models.llm import LLMConfig, RightPadding, build_llm

    mpd.initialize(seed=0)
    config = LLMConfig(num_layers=layers, max_position_embeddings=max(seq, 4096))
    model = build_llm(config, transformer_config=config.to_transformer_config(params_dtype=torch.bfloat16),
                      pg_collection=mpd.process_groups())
    model = model.cuda().train()
    lengths = torch.randint(seq // 2, seq + 1, (batch,))
    lengths[0] = seq
    left_mask = torch.arange(seq)[None, :] >= (seq - lengths)[:, None]
    positions = (left_mask.long().cumsum(-1) - 1).clamp(min=0)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    layout = RightPadding.from_left_padded(left_mask)
    runs = {
        "left-padded + [b,1,s,s] mask (previous)": dict(input_ids=ids.cuda(), position_ids=positions.cuda(),
                                                       padding_mask=left_mask.cuda()),
        "right-padded, causal, no mask (now)": dict(input_ids=layout.apply(ids).cuda(),
                                                    position_ids=layout.apply(positions).cuda(), padding_mask=None),
    }
    results = {}
    for name, kwargs in runs.items():
        seconds, peak = _timed(lambda: model(**kwargs, output="hidden"), repeats)
        results[name] = (seconds, peak)
        print(f"ok   llm {layers} layers b={batch} s={seq} bf16 [{name}]: {int(lengths.sum()) / seconds:,.0f} real "
              f"tokens/s, peak {peak:.2f} GiB")
    (old_t, old_m), (new_t, new_m) = results.values()
    print(f"ok   llm layout ratio (now vs previous): speed x{old_t / new_t:.2f}, peak memory x{new_m / old_m:.2f}")
    mpd.destroy()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--seq", type=positive_int, default=1024)
    parser.add_argument("--layers", type=positive_int, default=28)
    parser.add_argument("--repeats", type=positive_int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("FAIL no CUDA device")
        return 1
    from megatron_puffin.platform import setup

    setup()
    print(f"device {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()}), torch "
          f"{torch.__version__}")
    ok = check_sdpa_backends(args.batch, args.repeats)
    check_llm_layouts(args.batch, args.seq, args.layers, args.repeats)
    return 0 if ok else 1


if __name__ == "__main__":
    run_main(main)
