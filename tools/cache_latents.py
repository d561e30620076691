#!/usr/bin/env python
"""Store the frozen VAE's posterior moments of every sample beside its shard (training with --cached-latents).

    python tools/cache_latents.py --data /data/puffin4m/main /data/puffin4m/cross_view \
        --vae-path /models/stable-diffusion-3-medium-diffusers/vae --image-size 512 --image-size-unit 32 \
        [--dtype bfloat16] [--batch-size 16] [--device cuda]

Encodes the target image, the initial view and the camera map of each sample at the training resolution (the
loader's dynamic resize; camera maps at the target's size) and writes them as extra aligned fields of each shard;
the manifest records the VAE (config + weights SHA-256), the resolution and the dtype (docs/performance.md).
Re-running with the same VAE and flags skips finished shards; a shard holding latents of another VAE, resolution
or dtype is an error unless --overwrite is given. For a random tiny VAE (--vae-config) give the
training --seed: the VAE is drawn from it exactly as training draws it. On a CPU the tool keeps freed host memory for
reuse (about 1.5x faster at 512^2, the same latents); --no-host-malloc-cache turns that off.

Several GPUs: ``torchrun --nproc-per-node 8 tools/cache_latents.py ... --device cuda`` gives each process every
8th shard (no process group, no shard shared) and the GPU of its LOCAL_RANK; each prints its own counts.
"""
import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_puffin.process_lifetime import exit_quietly_while_starting  # noqa: E402

exit_quietly_while_starting(__name__, "cache_latents.py")  # Ctrl-C while the libraries below load: one line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="Dataset directories (shards at any depth).")
    vae = parser.add_mutually_exclusive_group(required=True)
    vae.add_argument("--vae-path", help="diffusers AutoencoderKL folder (the training --vae-path).")
    vae.add_argument("--vae-config", help="AutoencoderKL config.json of a random VAE (the training --vae-config).")
    parser.add_argument("--seed", type=int, default=1234, help="Training --seed (draws a --vae-config VAE).")
    parser.add_argument("--image-size", type=int, default=512, help="Training --image-size.")
    parser.add_argument("--image-size-unit", type=int, default=32, help="Training --image-size-unit.")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="Storage dtype of the moments (float32: bit-for-bit the online loss).")
    parser.add_argument("--vae-dtype", default=None, choices=["bfloat16", "float32"],
                        help="VAE compute dtype (default: float32 for --vae-config, bfloat16 for --vae-path, as "
                             "training with --bf16 loads it). Must be the training VAE's dtype.")
    parser.add_argument("--batch-size", type=int, default=16, help="Samples encoded per VAE call.")
    parser.add_argument("--device", default="cpu", help="Where the VAE runs (cpu, cuda).")
    parser.add_argument("--host-malloc-cache", action=argparse.BooleanOptionalAction, default=None,
                        help="Keep freed host memory in the process for reuse instead of handing it back to the "
                             "kernel after every VAE call (glibc; training's --host-malloc-cache). Default: on with "
                             "--device cpu, where it encodes about 1.5x faster (docs/performance.md); nothing to "
                             "gain on a GPU.")
    parser.add_argument("--no-progress", action="store_true", help="No progress bar (the samples encoded so far).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace latents of another VAE, resolution or dtype (default: stop, naming the shard).")
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="Python logging level.")
    return parser


def _device_problems(device: str) -> list:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        return [f"--device ({device}) is not a torch device; give cpu, cuda or cuda:N"]
    if parsed.type == "cuda" and not torch.cuda.is_available():
        return [f"--device {device}: no CUDA device is available to this process; use --device cpu"]
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        return [f"--device {device}: this process sees {torch.cuda.device_count()} CUDA device(s)"]
    return []


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    errors = [f"--{name.replace('_', '-')} ({getattr(args, name)}) must be >= 1"
              for name in ("image_size", "image_size_unit", "batch_size") if getattr(args, name) < 1]
    if args.image_size_unit >= 1 and args.image_size % args.image_size_unit:
        errors.append(f"--image-size ({args.image_size}) must be a multiple of --image-size-unit "
                      f"({args.image_size_unit})")
    missing = [path for path in [*args.data, args.vae_path or args.vae_config] if not os.path.exists(path)]
    errors += [f"{path} does not exist" for path in missing]
    from megatron_puffin.config.validate_paths import vae_file_problems
    from megatron_puffin.distributed.random import seed_problems

    errors += seed_problems("--seed", args.seed)

    if not missing:
        errors += vae_file_problems(args.vae_config, args.vae_path)
    import torch

    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and args.device == "cuda":  # one GPU per process of a torchrun launch
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    errors += _device_problems(args.device)
    if errors:
        print("error: " + "; ".join(errors), file=sys.stderr)
        return 2

    from megatron_puffin.training.host_memory import cache_for_device

    device_type = torch.device(args.device).type  # on by default on a CPU; before the first VAE call allocates
    cache_for_device(device_type == "cpu" if args.host_malloc_cache is None else args.host_malloc_cache, device_type)

    from megatron_puffin.data.latents import cache_dataset_latents
    from megatron_puffin.models.puffin import build_vae
    from megatron_puffin.models.puffin_config import PuffinModelConfig

    dtype = getattr(torch, args.vae_dtype or ("bfloat16" if args.vae_path else "float32"))
    try:
        vae = build_vae(PuffinModelConfig(vae_path=args.vae_path, vae_config=args.vae_config), dtype,
                        torch.device(args.device), args.seed)
    except (OSError, ValueError, TypeError, KeyError) as error:
        print(f"error: cannot build the VAE from {args.vae_path or args.vae_config}: {error}", file=sys.stderr)
        return 2
    try:
        counts = cache_dataset_latents(args.data, vae, args.image_size, args.image_size_unit, args.dtype,
                                       args.batch_size, args.overwrite, rank=rank, world_size=world_size,
                                       progress=not args.no_progress and rank == 0)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a lost mount: finished shards keep their latents, the others none
        print(f"error: writing the latents failed ({error.strerror or error}"
              f"{': ' + str(error.filename) if error.filename else ''}); the shards finished so far are kept: fix "
              "that and run the same command again, it skips them", file=sys.stderr)
        return 1
    process = f"process {rank} of {world_size}: " if world_size > 1 else ""
    bad = (f"; {counts['bad_samples']} sample(s) do not decode and have no latents (named above; training skips "
           "and counts them the same way)" if counts["bad_samples"] else "")
    print(f"{process}cached {args.dtype} VAE latents at --image-size {args.image_size}: {counts['written']} shard(s) "
          f"written, {counts['replaced']} replaced, {counts['skipped']} already done{bad}")
    return 0


if __name__ == "__main__":
    from megatron_puffin.process_lifetime import exit_on_ctrl_c, exit_process

    exit_process(exit_on_ctrl_c("cache_latents.py", main,
                            "the shards finished so far keep their latents: run the same command again, it skips them"))
