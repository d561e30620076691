"""DiT forward+backward time and peak memory: our megatron-core MMDiT vs diffusers' SD3Transformer2DModel.

Both models hold the same weights. In one run, the script measures:

    * ``plain``: a batch of target latents only. Baseline: ``SD3Transformer2DModel.forward``.
    * ``conds``: every sample also carries ``--num-conds`` clean condition latents (camera map, initial view) of
      the target's size, appended to the image stream. Baselines built from diffusers' own modules:
      ``diffusers-concat`` (per-batch patch embedding, concatenated stream, diffusers' joint blocks, no mask: the
      same computation as ours) and ``reference-mask`` (Puffin's reference forward: patch embedding one sample at a
      time and a dense ``[B, 1, L, L]`` boolean mask passed to SDPA in every block, built even when nothing is
      padded, docs/puffin.md §1.8 item 3 and §9.4; ``megatron_puffin.testing.reference_dit``, shared with
      ``bench_puffin.py``), and ``ours-all-queries``: ours with its last block computing every query and token as
      the reference does (the same module with ``attn.image_queries_only`` off; by default the last block only
      computes the targets' outputs, the only ones read: docs/dit.md).

Each time is the median of ``--repeats`` forward+backward passes (variants take turns, after ``--warmup`` passes).
Peak memory is measured in a separate pass per variant: on CUDA ``torch.cuda.max_memory_allocated`` above the
memory held before the pass; on CPU the peak process RSS above the RSS before the pass (sampled every 0.5 ms by a
thread, after returning freed heap memory to the OS with ``malloc_trim``).

Usage:
    python benchmarks/bench_dit.py [--device cpu] [--dtype fp32] [--batch-size 2] [--latent-size 32]
        [--num-layers 4] [--num-heads 6] [--head-dim 64] [--text-tokens 64] [--num-conds 2] [--threads 1]
        [--transformer-impl local]
"""
import argparse
import ctypes
import logging
import statistics
import threading
import time
import warnings
from typing import Callable, Dict, List

warnings.filterwarnings("ignore")

import psutil  # noqa: E402
import torch  # noqa: E402

from megatron_puffin.testing.reference_dit import reference_dynamic_forward  # noqa: E402
from megatron_puffin.platform import setup  # noqa: E402
from bench_flags import available_device, nonnegative_int, positive_int, run_main  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", type=available_device)
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--batch-size", type=positive_int, default=2)
    parser.add_argument("--latent-size", type=positive_int, default=32, help="latent side (tokens = (side / 2)^2)")
    parser.add_argument("--num-layers", type=positive_int, default=4)
    parser.add_argument("--num-heads", type=positive_int, default=6)
    parser.add_argument("--head-dim", type=positive_int, default=64)
    parser.add_argument("--text-tokens", type=positive_int, default=64, help="Puffin: 64 meta-query tokens")
    parser.add_argument("--joint-attention-dim", type=positive_int, default=512)
    parser.add_argument("--pooled-dim", type=positive_int, default=256)
    parser.add_argument("--num-conds", type=nonnegative_int, default=2,
                        help="condition latents per sample (image2image: 2)")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--warmup", type=nonnegative_int, default=2)
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU threads (1 gives stable numbers on shared hosts)")
    parser.add_argument("--transformer-impl", default="local", choices=["local", "transformer_engine"])
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile ours per joint block (megatron_puffin.models.compile, the --compile lever)")
    args = parser.parse_args()
    problems = _dit_problems(args)
    if problems:  # before any process group starts
        parser.error("; ".join(problems))
    return args


# The tower's flag names in its validation messages, as this benchmark spells them.
_BENCH_FLAGS = {"--dit-sample-size": "--latent-size", "--dit-attention-head-dim": "--head-dim",
                "--dit-num-attention-heads": "--num-heads", "--dit-num-layers": "--num-layers",
                "--dit-joint-attention-dim": "--joint-attention-dim", "--dit-pooled-projection-dim": "--pooled-dim",
                "--dit-patch-size": "the patch size"}


def _diffusers_kwargs(args) -> dict:
    """The ``SD3Transformer2DModel`` configuration the flags describe (the reference is built from it; ours from
    its ``DiTConfig``)."""
    return dict(sample_size=args.latent_size, patch_size=2, in_channels=16, out_channels=16,
                num_layers=args.num_layers, attention_head_dim=args.head_dim, num_attention_heads=args.num_heads,
                joint_attention_dim=args.joint_attention_dim, caption_projection_dim=args.num_heads * args.head_dim,
                pooled_projection_dim=args.pooled_dim, pos_embed_max_size=max(96, args.latent_size))


def _dit_problems(args) -> list:
    """The MMDiT's own validation of the flags' configuration, naming this benchmark's flags."""
    from megatron_puffin.models.dit import DiTConfig

    problems = DiTConfig.from_diffusers(_diffusers_kwargs(args)).validate()
    for tower_flag, bench_flag in _BENCH_FLAGS.items():
        problems = [problem.replace(tower_flag, bench_flag) for problem in problems]
    return problems


def _unpatchify(tokens: torch.Tensor, side: int, patch: int, channels: int) -> torch.Tensor:
    grid = side // patch
    tokens = tokens.reshape(tokens.shape[0], grid, grid, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", tokens).reshape(tokens.shape[0], channels, side, side)


def _diffusers_stream(ref, targets, conds, text, pooled, timestep):
    """Diffusers' modules on the concatenated ``[target | conds]`` stream (one patch-embedding call per condition
    slot, no mask); returns target velocities."""
    tokens = torch.cat([ref.pos_embed(targets)] + [ref.pos_embed(torch.stack(c)) for c in zip(*conds)], dim=1)
    temb = ref.time_text_embed(timestep, pooled)
    context = ref.context_embedder(text)
    for block in ref.transformer_blocks:
        context, tokens = block(hidden_states=tokens, encoder_hidden_states=context, temb=temb)
    target_len = (targets.shape[-1] // ref.config.patch_size) ** 2
    out = ref.proj_out(ref.norm_out(tokens[:, :target_len], temb))
    return _unpatchify(out, targets.shape[-1], ref.config.patch_size, ref.out_channels)


def _build_models(args, dtype, device):
    from diffusers import SD3Transformer2DModel

    from megatron_puffin.convert.sd3 import diffusers_to_mcore, load_dit_state_dict
    from megatron_puffin.distributed import initialize, process_groups
    from megatron_puffin.models.dit import DiTConfig, build_dit

    initialize(seed=0)
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs (on the host SD3-medium's 2 B parameters take ~20 s)
        ref = SD3Transformer2DModel(**_diffusers_kwargs(args)).to(dtype=dtype)
    config = DiTConfig.from_diffusers(dict(ref.config))
    tc = config.to_transformer_config(params_dtype=dtype)
    ours = build_dit(config, transformer_config=tc, transformer_impl=args.transformer_impl, device=device,
                    pg_collection=process_groups())
    load_dit_state_dict(ours, diffusers_to_mcore(ref.state_dict(), config))
    ours.train(), ref.train()
    return ours, ref


def _inputs(args, dtype, device):
    gen = torch.Generator(device=device).manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    b, side = args.batch_size, args.latent_size
    return dict(
        targets=randn(b, 16, side, side),
        conds=[[randn(16, side, side) for _ in range(args.num_conds)] for _ in range(b)],
        text=randn(b, args.text_tokens, args.joint_attention_dim),
        pooled=randn(b, args.pooled_dim),
        timestep=torch.rand(b, generator=gen, device=device) * 1000,
        weight=randn(b, 16, side, side),
    )


def _variants(ours, ref, x) -> Dict[str, Callable[[], torch.Tensor]]:
    args = (x["targets"], x["text"], x["pooled"], x["timestep"])
    stream_args = (x["targets"], x["conds"], x["text"], x["pooled"], x["timestep"])
    return {
        "plain/ours": lambda: ours(*args),
        "plain/diffusers": lambda: ref(*args).sample,
        "conds/ours": lambda: ours(*args, cond_hidden_states=x["conds"]),
        "conds/diffusers-concat": lambda: _diffusers_stream(ref, *stream_args),
        "conds/reference-mask": lambda: reference_dynamic_forward(ref, x["targets"], x["text"], x["pooled"],
                                                                  x["timestep"], x["conds"]),
        "conds/ours-all-queries": lambda: _all_queries(ours, lambda: ours(*args, cond_hidden_states=x["conds"])),
    }


def _all_queries(ours, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()`` with ours' last block computing every query (the reference's way; its outputs are the same)."""
    attention = ours.transformer_blocks[-1].attn
    trimmed = attention.image_queries_only
    attention.image_queries_only = False
    try:
        return fn()
    finally:
        attention.image_queries_only = trimmed


def _step(model_fn, weight, params, device) -> None:
    for p in params:
        p.grad = None
    out = model_fn()
    (out.float() * weight.float()).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()


class _RssPeak:
    """Peak RSS of this process while active, sampled by a thread."""

    def __init__(self, interval: float = 0.0005) -> None:
        self.process, self.interval, self.peak, self._stop = psutil.Process(), interval, 0, threading.Event()

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _peak_memory(fn, weight, params, device) -> int:
    """Bytes above the pre-pass level (parameters and inputs, gradients cleared) at the peak of one pass."""
    for p in params:
        p.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _step(fn, weight, params, device)
        return torch.cuda.max_memory_allocated() - before
    _trim_heap()
    with _RssPeak() as rss:
        before = rss.peak
        _step(fn, weight, params, device)
    return rss.peak - before


def main() -> None:
    args = _parse_args()
    logging.basicConfig(level=logging.WARNING)
    setup()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    ours, ref = _build_models(args, dtype, device)
    if args.compile:
        from megatron_puffin.models.compile import compile_model

        compile_model(ours)
    x = _inputs(args, dtype, device)
    variants = _variants(ours, ref, x)
    params = list(ours.parameters()) + list(ref.parameters())
    for _ in range(args.warmup):
        for fn in variants.values():
            _step(fn, x["weight"], params, device)
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            _step(fn, x["weight"], params, device)
            times[name].append(time.perf_counter() - start)
    memory = {name: _peak_memory(fn, x["weight"], params, device) for name, fn in variants.items()}
    _report(args, times, memory)


def _report(args, times, memory) -> None:
    median = {name: statistics.median(values) for name, values in times.items()}
    tokens = (args.latent_size // 2) ** 2
    print(f"DiT fwd+bwd, {args.device} {args.dtype}, threads={args.threads}, impl={args.transformer_impl}: "
          f"batch {args.batch_size}, {args.num_layers} blocks, hidden {args.num_heads * args.head_dim}, "
          f"{tokens} target tokens (+{args.num_conds}x{tokens} cond tokens), {args.text_tokens} text tokens")
    print(f"{'variant':28s} {'median ms':>10s} {'peak MiB':>10s}")
    for name in times:
        print(f"{name:28s} {1e3 * median[name]:10.1f} {memory[name] / 2**20:10.1f}")
    for baseline in ("plain/diffusers",):
        print(f"ratio time   plain/ours / {baseline}: {median['plain/ours'] / median[baseline]:.3f}")
        print(f"ratio memory plain/ours / {baseline}: {memory['plain/ours'] / max(memory[baseline], 1):.3f}")
    for baseline in ("conds/diffusers-concat", "conds/reference-mask", "conds/ours-all-queries"):
        print(f"ratio time   conds/ours / {baseline}: {median['conds/ours'] / median[baseline]:.3f}")
        print(f"ratio memory conds/ours / {baseline}: {memory['conds/ours'] / max(memory[baseline], 1):.3f}")


if __name__ == "__main__":
    run_main(main)
