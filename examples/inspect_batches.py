"""Show what training will feed the model from preprocessed shards: one micro-batch per task stream, its tensors and,
for the first sample, the prompt as the LLM reads it and the answer tokens it is trained on.

    python examples/inspect_batches.py --tokenizer tiny/tokenizer.model --image-size 96 \\
        --task-stream image2text:tiny/data/main:2 --task-stream cam2image:tiny/data/main:2

Use it on your own data after tools/preprocess_data.py, with the --task-stream / --tokenizer / --image-size values of
your stage's flag file, to check prompts, captions and camera sentences before training (docs/data.md, section 0).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

from megatron_puffin.process_lifetime import exit_quietly_while_starting  # noqa: E402

exit_quietly_while_starting(__name__, "inspect_batches.py")  # Ctrl-C while torch loads: one line

warnings.filterwarnings("ignore", category=UserWarning)

import torch  # noqa: E402

from megatron_puffin.data import DataConfig, build_data_loader  # noqa: E402
from megatron_puffin.data.loader import DataLoaderError  # noqa: E402
from megatron_puffin.data.templates import QUERY_TOKEN_INDEX  # noqa: E402
from megatron_puffin.data.tokenizer import PuffinTokenizer  # noqa: E402

TENSOR_KEYS = ("input_ids", "labels", "attention_mask", "vision_images", "target_images", "init_images",
               "camera_maps", "num_truncated", "num_cfg_dropped")


def describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return f"list of {len(value)} tensors, first {tuple(value[0].shape)}"
    return repr(value) if not isinstance(value, list) else f"list of {len(value)}"


def first_sample_text(batch, tokenizer: PuffinTokenizer) -> tuple:
    """(prompt as the LLM reads it, supervised answer or None for a generation task) of the batch's first sample;
    placeholders (negative ids: image and query slots) are shown as one <image> / <query> per run."""
    ids, mask = batch["input_ids"][0], batch["attention_mask"][0].bool()
    pieces, run = [], []
    for token in ids[mask].tolist():
        if token < 0:
            if run:
                pieces.append(tokenizer.decode(run, skip_special_tokens=False))
                run = []
            name = "<query>" if token == QUERY_TOKEN_INDEX else "<image>"
            if not pieces or not pieces[-1].startswith(name):
                pieces.append(name)
        else:
            run.append(token)
    if run:
        pieces.append(tokenizer.decode(run, skip_special_tokens=False))
    labels = batch["labels"][0] if "labels" in batch else None
    answer = None if labels is None else tokenizer.decode([t for t in labels.tolist() if t >= 0],
                                                         skip_special_tokens=False)
    return "".join(pieces), answer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="the run's --tokenizer")
    parser.add_argument("--task-stream", action="append", required=True,
                        help="TASK:PATH[,PATH...]:MICRO_BATCH_SIZE (repeat per stream), as pretrain_puffin.py takes it")
    parser.add_argument("--image-size", type=int, default=512, help="the run's --image-size (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="data order seed (default 0)")
    return parser


def one_line(error: Exception) -> str:
    """The library's message on one line: a list of problems (one per indented line) joined by "; "."""
    head, *problems = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
    return f"{head} {'; '.join(problems)}" if problems else head


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # the loader's "bad sample skipped" lines
    try:
        tokenizer = PuffinTokenizer(args.tokenizer)
        config = DataConfig(task_stream=args.task_stream, tokenizer=args.tokenizer, num_workers=0,
                            image_size=args.image_size, pin_memory=False)
        loader = build_data_loader(config, seed=args.seed)
    except (ValueError, OSError) as error:  # bad streams, datasets or tokenizer: the library's one-line messages
        print(f"inspect_batches.py: error: {one_line(error)}", file=sys.stderr)
        return 2
    iterator = iter(loader)
    for _ in range(len(args.task_stream)):
        try:
            batch = next(iterator)
        except (DataLoaderError, ValueError, OSError) as error:  # e.g. a stream none of whose samples decodes
            print(f"inspect_batches.py: error: {one_line(error)}", file=sys.stderr)
            return 1
        print(f"--- micro-batch of task {batch['task']}")
        for key in TENSOR_KEYS:
            if key in batch:
                print(f"  {key:<16} {describe(batch[key])}")
        prompt, answer = first_sample_text(batch, tokenizer)
        print(f"  first sample, prompt: {prompt!r}")
        print(f"  first sample, trained answer: {answer!r}" if answer is not None else
              "  first sample, trained on: the target image (flow matching; no text target)")
    print(f"loader state after {len(args.task_stream)} micro-batches: {loader.state_dict()}")
    if loader.bad_samples_total:
        print(f"{loader.bad_samples_total} sample(s) failed to decode and were replaced by the next one that does (the "
              "'bad sample skipped' lines name them); training skips and counts them the same way, up to "
              "--max-bad-samples")
    return 0


if __name__ == "__main__":
    from megatron_puffin.process_lifetime import exit_on_ctrl_c, exit_process

    exit_process(exit_on_ctrl_c("inspect_batches.py", main, "it only reads the shards: nothing to clean up"))
