"""Camera maps per second: analytic computation vs loading pre-rendered ``.pt`` files (the reference's way).

The reference stores one 3x512x512 float32 map (3 MB) per sample and reads it with ``torch.load`` (docs/puffin.md §3.6, §9.3).
This script writes the same maps to ``.pt`` files, then in one run measures:

    * ``torch.load``: one file per map, on an accelerator plus the copy to it, (a) from the page cache (files were
      just written: a best case the reference never sees, its 11 TB of maps do not fit in memory) and (b) after
      evicting the files from the page cache (``posix_fadvise``, untimed), so reads go to the storage device;
    * ``camera_map``: one validated map at a time (CPU only), or ``camera_maps`` with one camera on an accelerator;
    * ``camera_maps``: batches of ``--batch-size`` cameras, into fresh memory and into a reused ``out=`` buffer
      (on CPU, first-touch page faults of a fresh batch-sized tensor cost more than the arithmetic).

Each number is the best of ``--repeats`` passes over all maps, the methods' passes taking turns. Ratios are against
both ``torch.load`` variants.

Usage:
    python benchmarks/bench_camera_maps.py [--num-maps 128] [--batch-size 32] [--size 512] [--device cpu]
"""
import argparse
import math
import os
import tempfile
import time
from typing import Callable, List, Optional

import torch

from bench_flags import available_device, positive_int, run_main
from megatron_puffin.camera import camera_map, camera_maps


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-maps", type=positive_int, default=128,
                        help="maps per pass (also the number of .pt files)")
    parser.add_argument("--batch-size", type=positive_int, default=32,
                        help="cameras per camera_maps call in batched mode")
    parser.add_argument("--size", type=positive_int, default=512, help="map height and width")
    parser.add_argument("--repeats", type=positive_int, default=5, help="passes per method; the fastest is reported")
    parser.add_argument("--device", default="cpu", type=available_device,
                        help="device the maps are needed on (cpu, cuda, ...)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def _random_cameras(num_maps: int, seed: int) -> torch.Tensor:
    """[N, 3] (roll, pitch, vfov) in the ranges of docs/puffin.md §3.3."""
    generator = torch.Generator().manual_seed(seed)
    unit = torch.rand(num_maps, 3, generator=generator, dtype=torch.float64)
    low = torch.tensor([-0.7854, -0.7854, 0.3491], dtype=torch.float64)
    high = torch.tensor([0.7854, 0.7854, 1.8326], dtype=torch.float64)
    return low + unit * (high - low)


def _write_maps(cameras: torch.Tensor, size: int, folder: str) -> List[str]:
    paths = []
    for index, (roll, pitch, vfov) in enumerate(cameras.tolist()):
        path = os.path.join(folder, f"{index:06d}.pt")
        torch.save(camera_map(roll, pitch, vfov, size, size), path)
        paths.append(path)
    return paths


def _evict_from_page_cache(paths: List[str]) -> None:
    """Drops our own files from the OS page cache (Linux), so the next read goes to the storage device."""
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def _timed(run_pass: Callable[[], None], prepare: Optional[Callable[[], None]], device: torch.device) -> float:
    if prepare is not None:
        prepare()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run_pass()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _best_rates(methods, num_maps: int, repeats: int, device: torch.device) -> List[float]:
    """Maps per second of each method's fastest pass. Passes alternate between methods, so a burst of load from
    other processes on the machine hits all methods alike; one warm-up pass each comes first."""
    for _, run_pass, _ in methods:
        run_pass()
    best = [math.inf] * len(methods)
    for _ in range(repeats):
        for index, (_, run_pass, prepare) in enumerate(methods):
            best[index] = min(best[index], _timed(run_pass, prepare, device))
    return [num_maps / seconds for seconds in best]


def _methods(cameras: torch.Tensor, paths: List[str], args: argparse.Namespace, device: torch.device):
    size, batch = args.size, args.batch_size
    on_device = cameras.to(device)

    def load_pass() -> None:
        for path in paths:
            torch.load(path, map_location="cpu", weights_only=True).to(device, non_blocking=True)

    def single_pass() -> None:
        if device.type == "cpu":
            for roll, pitch, vfov in cameras.tolist():
                camera_map(roll, pitch, vfov, size, size)
        else:
            for index in range(on_device.shape[0]):
                camera_maps(on_device[index : index + 1], size, size)

    def batched_pass() -> None:
        for start in range(0, on_device.shape[0], batch):
            camera_maps(on_device[start : start + batch], size, size)

    buffer = torch.empty(batch, 3, size, size, device=device)

    def batched_out_pass() -> None:
        for start in range(0, on_device.shape[0], batch):
            chunk = on_device[start : start + batch]
            camera_maps(chunk, size, size, out=buffer[: chunk.shape[0]])

    load_name = "torch.load .pt" + ("" if device.type == "cpu" else f" + copy to {device.type}")
    methods = [(f"{load_name} (page-cached)", load_pass, None)]
    if hasattr(os, "posix_fadvise"):
        methods.append((f"{load_name} (evicted)", load_pass, lambda: _evict_from_page_cache(paths)))
    return methods + [
        ("camera_map (single)", single_pass, None),
        (f"camera_maps (batch {batch})", batched_pass, None),
        (f"camera_maps (batch {batch}, out=)", batched_out_pass, None),
    ]


def main() -> None:
    args = _parse_args()
    device = torch.device(args.device)
    cameras = _random_cameras(args.num_maps, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_camera_maps_") as folder:
        paths = _write_maps(cameras, args.size, folder)
        megabytes = sum(os.path.getsize(path) for path in paths) / args.num_maps / 2**20
        methods = _methods(cameras, paths, args, device)
        rates = list(zip([method[0] for method in methods], _best_rates(methods, args.num_maps, args.repeats, device)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"camera maps {args.size}x{args.size}, {args.num_maps} maps/pass, best of {args.repeats}, "
        f"device {device} ({name})"
    )
    print(f".pt file size {megabytes:.2f} MiB per map")
    baselines = [(name, rate) for name, rate in rates if name.startswith("torch.load")]
    header = "".join(f"{'vs ' + ('cached' if 'cached' in name else 'evicted') + ' load':>17s}" for name, _ in baselines)
    print(f"{'method':44s} {'maps/s':>10s}{header}")
    for method, rate in rates:
        ratios = "".join(f"{rate / baseline:16.2f}x" for _, baseline in baselines)
        print(f"{method:44s} {rate:10.1f}{ratios}")

if __name__ == "__main__":
    run_main(main)
