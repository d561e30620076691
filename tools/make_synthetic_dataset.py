#!/usr/bin/env python
"""Render a synthetic Puffin-4M (procedural ray-cast scenes with known cameras) in the real folder layout.

    python tools/make_synthetic_dataset.py --output /tmp/puffin_synth --num-samples 1000 --image-size 128 --seed 0

Writes the main subset (base + thinking captions), cross_view/ pairs and photography/ samples, cameras.csv ground
truth per subset, optionally a held-out split in <output>/heldout (--num-heldout), and a SentencePiece tokenizer trained on the captions (--tokenizer-out, default
<output>/tokenizer/puffin_synthetic.model) with the chat special tokens, so nothing has to be downloaded.
Deterministic from --seed (independent of --workers).
"""
import argparse
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_puffin.process_lifetime import exit_quietly_while_starting  # noqa: E402

exit_quietly_while_starting(__name__, "make_synthetic_dataset.py")  # Ctrl-C while the libraries below load: one line

from megatron_puffin.data.synthetic import SyntheticOptions, make_synthetic_dataset  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("output")
    group.add_argument("--output", required=True, type=Path, help="Output root (the training_data folder).")
    group.add_argument("--tokenizer-out", type=Path, default=None,
                       help="SentencePiece model path (default <output>/tokenizer/puffin_synthetic.model).")
    group.add_argument("--no-tokenizer", action="store_true", help="Do not train a tokenizer.")
    group.add_argument("--tokenizer-vocab-size", type=int, default=1024, help="Target vocabulary size.")
    group.add_argument("--camera-map-size", type=int, default=None,
                       help="Also write reference-style cam_folder/*.pt camera maps of this size (e.g. 512).")
    group = parser.add_argument_group("content")
    group.add_argument("--num-samples", required=True, type=int, help="Main (single-view) samples.")
    group.add_argument("--num-cross-view", type=int, default=None, help="Cross-view pairs (default N // 4).")
    group.add_argument("--num-photography", type=int, default=None, help="Photography samples (default N // 8).")
    group.add_argument("--num-heldout", type=int, default=0,
                       help="Also write a held-out split to <output>/heldout (same layout, other random streams): this "
                       "many main samples, N // 4 cross-view pairs, N // 8 photography samples (default 0: none).")
    group.add_argument("--image-size", type=int, default=128, help="Square image side in pixels (default 128).")
    group.add_argument("--seed", type=int, default=0, help="Seed (default 0).")
    group.add_argument("--supersample", type=int, default=2, help="Rays per pixel side (default 2).")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="Rendering processes.")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megatron_puffin.process_lifetime import WorkerLost, one_process_problem

    problem = one_process_problem("make_synthetic_dataset.py")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    tokenizer = None if args.no_tokenizer else (args.tokenizer_out or args.output / "tokenizer" / "puffin_synthetic.model")
    options = SyntheticOptions(
        output=args.output, num_samples=args.num_samples, image_size=args.image_size, seed=args.seed,
        num_cross_view=args.num_cross_view, num_photography=args.num_photography, workers=args.workers,
        tokenizer_out=tokenizer, tokenizer_vocab_size=args.tokenizer_vocab_size,
        camera_map_size=args.camera_map_size, supersample=args.supersample, num_heldout=args.num_heldout,
    )
    started = time.perf_counter()
    try:
        sizes = make_synthetic_dataset(options)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except WorkerLost as error:
        print(f"error: {error}; run the same command again (with fewer --workers if the machine ran out of memory; "
              "it starts over)", file=sys.stderr)
        return 1
    except OSError as error:  # a full disk, a lost mount
        print(f"error: writing {args.output} failed ({error.strerror or error}); free space and run the same command "
              "again (it starts over)", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    print(f"wrote {args.output}: {sizes} in {elapsed:.1f} s" + (f"; tokenizer {tokenizer}" if tokenizer else ""))
    return 0


if __name__ == "__main__":
    from megatron_puffin.process_lifetime import exit_on_ctrl_c, exit_process

    exit_process(exit_on_ctrl_c("make_synthetic_dataset.py", main,
                            "--output is incomplete: run the same command again (it starts over)"))
