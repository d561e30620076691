"""Read one micro-batch of every task stream from preprocessed shards and print what the model will receive.

    python examples/inspect_batches.py --tokenizer TOK --task-stream image2text:DATA/main:4 ...

Part of the interim quickstart (the training loop arrives with issue 7).
"""
from __future__ import annotations

import argparse
import warnings

warnings.filterwarnings("ignore", category=UserWarning)

import torch  # noqa: E402

from megatron_puffin.data import DataConfig, build_data_loader  # noqa: E402


def describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return f"list of {len(value)} tensors, first {tuple(value[0].shape)}"
    return repr(value) if not isinstance(value, list) else f"list of {len(value)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--task-stream", action="append", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = DataConfig(task_stream=args.task_stream, tokenizer=args.tokenizer, num_workers=0, image_size=128)
    loader = build_data_loader(config, seed=args.seed)
    iterator = iter(loader)
    for _ in range(len(args.task_stream)):
        batch = next(iterator)
        print(f"--- micro-batch of task {batch['task']}")
        for key in ("input_ids", "labels", "attention_mask", "vision_images", "target_images", "init_images",
                    "camera_maps", "num_truncated", "num_cfg_dropped"):
            if key in batch:
                print(f"  {key:<16} {describe(batch[key])}")
    print(f"loader state after {len(args.task_stream)} micro-batches: {loader.state_dict()}")


if __name__ == "__main__":
    main()
