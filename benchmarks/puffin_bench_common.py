"""What ``bench_puffin.py`` and ``bench_training.py`` share: their data and model-size flags, the common run flags,
and the synthetic Puffin-4M dataset both render (with an SD3-shaped VAE sized by ``--vae-width``).

Importing this module puts ``tests/`` on ``sys.path`` (for ``helpers.puffin``).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import torch

_TESTS = str(Path(__file__).resolve().parents[1] / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from helpers.puffin import make_tiny_dataset  # noqa: E402
from megatron_puffin.testing.reference_puffin import ReferencePuffin  # noqa: E402
from megatron_puffin.training.objectives import puffin_loss  # noqa: E402
from bench_flags import nonnegative_float, positive_int, synthetic_image_size, synthetic_num_samples  # noqa: E402


def median_interval(values: List[float], resamples: int = 2000, seed: int = 0) -> Tuple[float, float]:
    """A 95 % interval of the median of ``values``: the 2.5th and 97.5th percentiles of the medians of ``resamples``
    resamplings with replacement (a percentile bootstrap, seeded: the same values give the same interval)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * (resamples - 1))], medians[int(round(0.975 * (resamples - 1)))]


def paired_verdict(low: float, high: float) -> str:
    """What a 95 % interval of ours / reference ratios says about the two sides."""
    if low > 1.0:
        return "ours faster"
    if high < 1.0:
        return "ours slower"
    return "cannot tell apart"


PAIRED_HEADER = f"{'paired':>7s} {'95% interval':>13s} {'verdict':>17s}"
"""The column titles of :func:`paired_columns`."""


def paired_columns(ratios: List[float], resamples: int = 2000) -> str:
    """Table columns for one task's paired ratios: their median, its 95 % interval and what that says."""
    low, high = median_interval(ratios, resamples)
    return f"{statistics.median(ratios):7.3f} {f'{low:.3f}-{high:.3f}':>13s} {paired_verdict(low, high):>17s}"


def model_loss(model, batch):
    """The loss to back-propagate of one micro-batch: ours through its objective (``puffin_loss``), the reference
    assembly through its own forward (it computes its loss itself and has no pipeline stages)."""
    if isinstance(model, ReferencePuffin):
        return model(batch)["loss"]
    return puffin_loss(model, batch).loss


def add_data_and_model_args(parser: argparse.ArgumentParser, model_title: str = "model size") -> None:
    """The ``data`` and model-size argument groups (the model-size group titled ``model_title``)."""
    group = parser.add_argument_group("data")
    group.add_argument("--real-proportions", action="store_true",
                       help="Puffin's real token counts and image size with every tower scaled by one factor "
                            "(real_proportions.py); overrides the model sizes and --image-size")
    group.add_argument("--full-size", action="store_true",
                       help="GPU: the released Puffin's widths, heads, vocabulary and VAE at the real token counts, "
                            "each transformer's depth divided by --depth-divisor; overrides the model sizes and "
                            "--image-size")
    group.add_argument("--host-bound", action="store_true",
                       help="the operators of --full-size (its layers, / --depth-divisor) at tiny widths: measures "
                            "each side's host cost per operator (Python, dispatch, autograd), what an eager GPU step "
                            "pays when its kernels are short; runs on a CPU")
    group.add_argument("--depth-divisor", type=positive_int, default=1,
                       help="with --full-size or --host-bound: layers of every transformer / N (with --full-size both "
                            "variants must fit one GPU)")
    group.add_argument("--micro-batch-size", type=positive_int, default=None,
                       help="default 4 (2 with a size preset: --real-proportions, --full-size, --host-bound)")
    group.add_argument("--image-size", type=synthetic_image_size, default=128,
                       help="square synthetic images (96-4096, a multiple of 32)")
    group.add_argument("--num-samples", type=synthetic_num_samples, default=32,
                       help="synthetic main samples (cross-view: N / 4)")
    group = parser.add_argument_group(model_title)
    group.add_argument("--llm-layers", type=positive_int, default=4)
    group.add_argument("--llm-hidden", type=positive_int, default=256)
    group.add_argument("--llm-heads", type=positive_int, default=4)
    group.add_argument("--llm-kv-heads", type=positive_int, default=2)
    group.add_argument("--llm-ffn", type=positive_int, default=704)
    group.add_argument("--vision-layers", type=positive_int, default=2)
    group.add_argument("--vision-hidden", type=positive_int, default=128)
    group.add_argument("--vision-heads", type=positive_int, default=2)
    group.add_argument("--num-queries", type=positive_int, default=64, help="meta queries (Puffin: 64)")
    group.add_argument("--connector-layers", type=positive_int, default=2)
    group.add_argument("--connector-hidden", type=positive_int, default=128)
    group.add_argument("--connector-heads", type=positive_int, default=2)
    group.add_argument("--dit-layers", type=positive_int, default=4)
    group.add_argument("--dit-heads", type=positive_int, default=4)
    group.add_argument("--dit-head-dim", type=positive_int, default=64)
    group.add_argument("--vae-width", type=positive_int, default=32,
                       help="channels of the 4-level AutoencoderKL (x8 down)")
    # Set by --real-proportions; None keeps the toy derivations (4x MLPs, tokenizer vocabulary, dims from the DiT).
    parser.set_defaults(llm_vocab=None, vision_ffn=None, connector_ffn=None, connector_pooled=None,
                        connector_joint=None, dit_caption=None, vae_blocks=None, vae_layers_per_block=1)


def resolve_sizes(args: argparse.Namespace) -> None:
    """Apply the size preset (``--real-proportions``, ``--full-size`` or ``--host-bound``; at most one) and fill the
    derived sizes left None (in place)."""
    presets = [flag for flag, on in (("--real-proportions", args.real_proportions), ("--full-size", args.full_size),
                                     ("--host-bound", args.host_bound)) if on]
    if len(presets) > 1:
        raise SystemExit(f"{' and '.join(presets)} are {len(presets)} size presets; give one")
    if args.depth_divisor != 1 and not (args.full_size or args.host_bound):
        raise SystemExit("--depth-divisor applies to --full-size and --host-bound only; add one of them or drop it")
    if args.full_size and not torch.cuda.is_available():
        raise SystemExit("--full-size needs a CUDA GPU (the released widths hold billions of parameters per variant); "
                         "on a CPU use --real-proportions")
    if presets:
        import real_proportions

        real_proportions.apply(args)
    if args.micro_batch_size is None:
        args.micro_batch_size = 4
    dit_hidden = args.dit_heads * args.dit_head_dim
    args.vision_ffn = args.vision_ffn or 4 * args.vision_hidden
    args.connector_ffn = args.connector_ffn or 4 * args.connector_hidden
    args.connector_pooled = args.connector_pooled or dit_hidden // 2
    args.connector_joint = args.connector_joint or dit_hidden
    args.dit_caption = args.dit_caption or dit_hidden


LEVERS = ("compile", "cached-latents", "host-malloc-cache")


class ActivationMeter:
    """Bytes of the distinct tensor storages autograd saves for backward while it is active (a forward pass),
    leaving out the storages in ``exclude`` (the model's parameters, which linear layers save too): the activation
    memory a backward pass needs, measured the same way for both models on any device."""

    def __init__(self, exclude: Iterable[int] = ()) -> None:
        self.storages: Dict[int, int] = {}
        self.exclude = set(exclude)

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> "ActivationMeter":
        import torch

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def activation_bytes_by_task(model, batches) -> Dict[str, int]:
    """:class:`ActivationMeter` reading (parameters excluded) over a forward pass of each batch, per task (the
    largest where a task has several batches); gradients are not kept."""
    parameters = [p.untyped_storage().data_ptr() for p in model.parameters()]
    peaks: Dict[str, int] = {}
    for batch in batches:
        with ActivationMeter(exclude=parameters) as meter:
            loss = model_loss(model, batch)
        del loss
        peaks[batch["task"]] = max(peaks.get(batch["task"], 0), meter.bytes)
    return peaks


def activation_bytes(model, batches) -> int:
    """Largest :func:`activation_bytes_by_task` reading over the batches."""
    return max(activation_bytes_by_task(model, batches).values())


def add_common_run_args(group: argparse._ArgumentGroup, loss_tolerance: float, loss_tolerance_help: str) -> None:
    """``--threads``, ``--hf-attn``, ``--loss-tolerance`` (default and help per benchmark) and ``--seed``."""
    group.add_argument("--threads", type=positive_int, default=1,
                       help="CPU threads (1 gives stable numbers on shared hosts)")
    group.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"], help="Qwen2 attention of the reference")
    group.add_argument("--loss-tolerance", type=nonnegative_float, default=loss_tolerance, help=loss_tolerance_help)
    group.add_argument("--seed", type=int, default=0)


def vae_config(args: argparse.Namespace) -> dict:
    """An SD3-shaped AutoencoderKL (16 latent channels, spatial factor 8) at a small width (``--vae-width``), or
    the real-proportion VAE's block widths."""
    if args.vae_blocks:
        from real_proportions import sd3_vae_config

        return sd3_vae_config(args.vae_blocks, args.vae_layers_per_block, args.image_size)
    width = args.vae_width
    return dict(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[width // 2, width, width, width],
        layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        norm_num_groups=8, sample_size=args.image_size, scaling_factor=1.5305, shift_factor=0.0609,
    )


def make_dataset(root: Path, args: argparse.Namespace) -> Dict[str, str]:
    """The synthetic dataset, tokenizer and VAE config under ``root`` (``helpers.puffin.make_tiny_dataset``) sized
    by ``--num-samples`` / ``--image-size`` / ``--vae-width`` and seeded by ``--seed``; returns their paths."""
    return make_tiny_dataset(root, num_samples=args.num_samples, seed=args.seed, image_size=args.image_size,
                             vae_config=vae_config(args))
