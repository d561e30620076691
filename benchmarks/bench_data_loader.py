#!/usr/bin/env python
"""Data loader and preprocessing throughput, against the reference's per-file loading, in the same run.

    python benchmarks/bench_data_loader.py [--num-samples 200] [--image-size 512] [--batch-size 8]

1. Renders a synthetic Puffin-4M (main subset) at --image-size, including reference-style ``cam_folder/*.pt``
   camera maps (torch.save'd float32 (3, 512, 512), 3 MB each).
2. Preprocessing: ``preprocess`` with 1, 2, ... workers -> samples/s, samples/s per worker, scaling.
3. Loading one epoch of cam2image and image2text micro-batches (read, decode, dynamic resize, tokenise, camera map,
   collate) through
     * ours: ``build_data_loader`` over the indexed shards (memory-mapped; camera maps computed from 3 floats);
     * reference-style: a Dataset that opens the JPEG, the caption JSON and the ``.pt`` camera map of every sample
       (what the reference does), with the same resize, tokeniser, prompt template and collation,
   each with 0 and 2 DataLoader workers, best of --repeats. Files are in the page cache for both (warm runs), which
   understates the per-file cost on network file systems.
"""
import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

import torch  # noqa: E402

from megatron_puffin.camera import split_caption  # noqa: E402
from megatron_puffin.data import DataConfig, build_data_loader  # noqa: E402
from megatron_puffin.data import templates  # noqa: E402
from megatron_puffin.data.collate import left_pad  # noqa: E402
from megatron_puffin.data.images import decode_image, dynamic_resize_image, pad_to_square, to_tensor  # noqa: E402
from megatron_puffin.data.preprocess import PreprocessOptions, preprocess  # noqa: E402
from megatron_puffin.data.synthetic import SyntheticOptions, make_synthetic_dataset  # noqa: E402
from megatron_puffin.data.tokenizer import PuffinTokenizer  # noqa: E402
from megatron_puffin.files import folder_problem  # noqa: E402
from bench_flags import int_list, positive_int, run_main, synthetic_image_size  # noqa: E402


class ReferenceStyleDataset(torch.utils.data.Dataset):
    """Per-sample file opens as in the reference: image file, caption JSON, ``.pt`` camera map (docs/puffin.md §3.1, §3.6)."""

    def __init__(self, root: Path, tokenizer: PuffinTokenizer, task: str, image_size: int):
        self.root, self.tokenizer, self.task, self.image_size = root, tokenizer, task, image_size
        self.records = json.loads((root / "summary.json").read_text())

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        with open(self.root / "local_folder" / record["image"], "rb") as handle:
            image = to_tensor(dynamic_resize_image(decode_image(handle.read()), self.image_size))
        with open(self.root / "cap_folder" / record["annotation"]) as handle:
            caption = json.load(handle)["caption"].strip()
        if self.task == "cam2image":
            camera_path = self.root / "cam_folder" / record["annotation"].replace(".json", ".pt")
            camera = torch.load(camera_path, weights_only=True) / (math.pi / 2)
            prompt = templates.instruction(templates.GENERATION_TEMPLATE.format(input=caption))
            ids = self.tokenizer.encode(prompt) + [templates.QUERY_TOKEN_INDEX] * 64
            return torch.tensor(ids), image, camera, None
        split_caption(caption)  # the reference parses captions with regexes too
        head = self.tokenizer.encode("<|im_start|>user\n")
        tail = self.tokenizer.encode("\n" + templates.caption_prompt(index % 13) + "<|im_end|>\n<|im_start|>assistant\n")
        answer = self.tokenizer.encode(caption) + [self.tokenizer.im_end_id, self.tokenizer.newline_id]
        square = pad_to_square(image)
        ids = head + [templates.INPUT_IMAGE_TOKEN_INDEX] * ((square.shape[-1] // 32) ** 2) + tail + answer
        labels = [templates.IGNORE_INDEX] * (len(ids) - len(answer)) + answer[:-1] + [templates.IGNORE_INDEX]
        return torch.tensor(ids), square, None, torch.tensor(labels)


def reference_collate(pad_id):
    def collate(samples):
        ids = left_pad([s[0] for s in samples], pad_id)
        mask = ids.ne(pad_id)
        batch = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0),
                 "images": torch.stack([s[1] for s in samples])}
        if samples[0][2] is not None:
            batch["camera_maps"] = torch.stack([s[2] for s in samples])
        if samples[0][3] is not None:
            batch["labels"] = left_pad([s[3] for s in samples], templates.IGNORE_INDEX)
        return batch
    return collate


def drop_page_cache(*roots):
    """Evicts the files under ``roots`` from the page cache (posix_fadvise DONTNEED; only these files)."""
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file():
                descriptor = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(descriptor)


def warmup_batches(workers: int) -> int:
    """Untimed batches before timing: one per loader worker (each worker's start-up), at least one."""
    return max(1, workers)


def time_batches(iterator, num_batches, warmup):
    """Seconds to pull ``num_batches`` batches after ``warmup`` batches (worker start-up excluded)."""
    for _ in range(warmup):
        next(iterator)
    started = time.perf_counter()
    for _ in range(num_batches):
        next(iterator)
    return time.perf_counter() - started


def bench_ours(index_dir, tokenizer, task, workers, batch_size, num_batches, image_size, maps=True):
    config = DataConfig(task_stream=[f"{task}:{index_dir}:{batch_size}"], tokenizer=str(tokenizer),
                        num_workers=workers, prefetch_factor=2, pin_memory=False, image_size=image_size,
                        cfg_text_dropout_prob=0.0, camera_maps_in_loader=maps)
    return time_batches(iter(build_data_loader(config, seed=0)), num_batches, warmup_batches(workers))


def bench_ours_without_maps(*args):
    """Ours, camera values only: maps are left to the device (the model computes them analytically)."""
    return bench_ours(*args, maps=False)


def bench_reference(raw_dir, tokenizer, task, workers, batch_size, num_batches, image_size):
    dataset = ReferenceStyleDataset(raw_dir, PuffinTokenizer(tokenizer), task, image_size)
    sampler = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    pad = 0 if task == "image2text" else PuffinTokenizer(tokenizer).pad_id
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                         collate_fn=reference_collate(pad),
                                         **({"prefetch_factor": 2} if workers else {}))
    return time_batches(iter(loader), num_batches, warmup_batches(workers))


def bench_preprocess(raw_dir, work, worker_counts, repeats):
    rows = []
    for workers in worker_counts:
        best = None
        for repeat in range(repeats):
            out = work / f"pre_{workers}_{repeat}"
            report = preprocess(PreprocessOptions(raw_dir, out, workers=workers, shard_size=64, progress=False))
            best = max(best or 0, report["records_per_s"])
            shutil.rmtree(out)
        rows.append({"workers": workers, "samples_per_s": best, "per_worker": round(best / workers, 1)})
    base = rows[0]["samples_per_s"]
    for row in rows:
        row["scaling"] = round(row["samples_per_s"] / base, 2)
    return rows


def bench_loaders(args, raw, index, tokenizer, task, workers, num_batches, cache):
    """One row: ours (with and without loader-side camera maps) and the reference-style loader."""
    timings = {}
    runs = (("ours", bench_ours, index / "main"), ("ours_maps_on_device", bench_ours_without_maps, index / "main"),
            ("reference", bench_reference, raw))
    for name, bench, source in runs:
        best = None
        for _ in range(args.repeats):
            if cache == "cold":
                drop_page_cache(raw, index)
            seconds = bench(source, tokenizer, task, workers, args.batch_size, num_batches, args.image_size)
            best = seconds if best is None else min(best, seconds)
        timings[name] = best
    samples = num_batches * args.batch_size
    row = {"cache": cache, "task": task, "workers": workers}
    row.update({name: round(samples / seconds, 1) for name, seconds in timings.items()})
    row["ratio"] = round(timings["reference"] / timings["ours"], 2)
    return row


def directory_bytes(root, exclude=()):
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file() and p.name not in exclude)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=positive_int, default=200)
    parser.add_argument("--image-size", type=synthetic_image_size, default=512)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--loader-workers", type=int_list(0), default=[0, 2], help="comma list (default 0,2)")
    parser.add_argument("--preprocess-workers", type=int_list(1), default=[1, 2], help="comma list (default 1,2)")
    parser.add_argument("--repeats", type=positive_int, default=2)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="scratch folder for the synthetic data, its shards and tokenizer, rewritten by every run "
                             "(default: a new temporary folder, removed at the end)")
    args = parser.parse_args(argv)
    # The reference-style loader runs one epoch: the warm-up and timed batches of the largest worker count fit in it.
    warmup = warmup_batches(max(args.loader_workers))
    needed = (warmup + 1) * args.batch_size
    if args.num_samples < needed:
        parser.error(f"--num-samples ({args.num_samples}) must be at least {needed}: one epoch of --batch-size "
                     f"{args.batch_size} must hold the untimed warm-up batches (one per loader worker) and one timed")
    if args.work_dir is not None and (problem := folder_problem(args.work_dir)):
        parser.error(f"--work-dir ({args.work_dir.absolute()}): {problem}")
    torch.set_num_threads(1)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        raw, index, tokenizer = work / "raw", work / "idx", work / "tok.model"
        started = time.perf_counter()
        make_synthetic_dataset(SyntheticOptions(raw, args.num_samples, args.image_size, seed=0, num_cross_view=0,
                                                num_photography=0, workers=2, tokenizer_out=tokenizer, supersample=1,
                                                camera_map_size=512))
        print(f"synthetic data: {args.num_samples} samples {args.image_size}px in "
              f"{time.perf_counter() - started:.1f} s")
        preprocess_rows = bench_preprocess(raw, work, args.preprocess_workers, args.repeats)
        preprocess(PreprocessOptions(raw, index, workers=2, progress=False))
        num_batches = args.num_samples // args.batch_size - warmup
        results = []
        for cache in ("warm", "cold"):
            for task in ("cam2image", "image2text"):
                for workers in args.loader_workers:
                    results.append(bench_loaders(args, raw, index, tokenizer, task, workers, num_batches, cache))
        sizes = {"raw_bytes": directory_bytes(raw, exclude=("tok.model",)), "indexed_bytes": directory_bytes(index)}
        print(f"\npreprocessing ({args.num_samples} samples of {args.image_size}px):")
        for row in preprocess_rows:
            print(f"  workers {row['workers']}: {row['samples_per_s']:8.1f} samples/s  "
                  f"({row['per_worker']:.1f} per worker, x{row['scaling']} vs 1 worker)")
        print(f"\nloader, {num_batches} micro-batches of {args.batch_size} after warm-up "
              f"(samples/s, best of {args.repeats}):")
        for row in results:
            print(f"  {row['cache']} {row['task']:10s} workers {row['workers']}: ours {row['ours']:7.1f}"
                  f" (maps on device: {row['ours_maps_on_device']:7.1f}), reference-style {row['reference']:7.1f}, "
                  f"ratio x{row['ratio']}")
        print(f"\non disk: Puffin-4M layout with .pt maps {sizes['raw_bytes'] / 2**20:.1f} MiB, "
              f"indexed shards {sizes['indexed_bytes'] / 2**20:.1f} MiB")
        print(json.dumps({"preprocess": preprocess_rows, "loader": results, "disk": sizes}))
    finally:  # also on Ctrl-C or SIGTERM (bench_flags.run_main)
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    run_main(main, kept="no result; its temporary data was removed (a --work-dir you named is kept)")
