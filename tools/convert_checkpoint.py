"""Convert LLM weights between a Hugging Face Qwen2 directory and a megatron-core distributed checkpoint.

HF -> megatron-core, at any tensor/pipeline layout (run with as many processes as TP x PP):

    torchrun --nproc-per-node 2 tools/convert_checkpoint.py hf-to-mcore --hf-dir Qwen2.5-1.5B-Instruct \\
        --output ckpt/qwen_tp2 --tensor-model-parallel-size 2

megatron-core -> HF (one process; distributed checkpoints load at any layout):

    python tools/convert_checkpoint.py mcore-to-hf --input ckpt/qwen_tp2 --output qwen_hf

The checkpoint's ``puffin_meta.json`` keeps the HF config, so the way back needs no other input.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import warnings

warnings.filterwarnings("ignore", category=UserWarning)

import megatron_puffin.distributed as mpd  # noqa: E402
from megatron_puffin.convert.hf_io import load_hf_directory, save_hf_directory  # noqa: E402
from megatron_puffin.convert.qwen2 import hf_to_mcore, load_llm_state_dict, mcore_to_hf  # noqa: E402
from megatron_puffin.models.llm import LLMConfig, build_llm  # noqa: E402
from megatron_puffin.training.checkpointing import load_model_checkpoint, read_metadata, save_checkpoint  # noqa: E402

logger = logging.getLogger("convert_checkpoint")


def hf_to_mcore_command(args: argparse.Namespace) -> None:
    hf_config, hf_state = load_hf_directory(args.hf_dir)
    config = LLMConfig.from_hf(hf_config)
    ctx = mpd.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, seed=0)
    model = build_llm(config, pre_process=ctx.is_first_pipeline_stage, post_process=ctx.is_last_pipeline_stage)
    load_llm_state_dict(model, hf_to_mcore(hf_state, config), config)
    metadata = {
        "kind": "llm",
        "source": args.hf_dir,
        "hf_config": hf_config,
        "llm_config": dataclasses.asdict(config),
        "saved_layout": {"tp": ctx.tensor_model_parallel_size, "pp": ctx.pipeline_model_parallel_size},
    }
    save_checkpoint(model.sharded_state_dict(), args.output, metadata=metadata)
    if ctx.rank == 0:
        logger.info("wrote %s (TP=%d, PP=%d)", args.output, ctx.tensor_model_parallel_size,
                    ctx.pipeline_model_parallel_size)
    mpd.destroy()


def mcore_to_hf_command(args: argparse.Namespace) -> None:
    metadata = read_metadata(args.input)
    if not metadata or "llm_config" not in metadata:
        raise SystemExit(f"{args.input} has no puffin_meta.json with an llm_config; was it written by this tool?")
    config = LLMConfig(**metadata["llm_config"])
    mpd.initialize(seed=0)
    model = build_llm(config)
    load_model_checkpoint(model, args.input)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    hf_config = dict(metadata.get("hf_config") or config.to_hf())
    save_hf_directory(args.output, hf_config, mcore_to_hf(state, config))
    logger.info("wrote %s", args.output)
    mpd.destroy()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_mcore = commands.add_parser("hf-to-mcore", help="HF Qwen2 directory -> distributed checkpoint")
    to_mcore.add_argument("--hf-dir", required=True, help="HF directory with config.json and safetensors")
    to_mcore.add_argument("--output", required=True, help="new checkpoint directory (must not exist)")
    to_mcore.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP of the writing processes")
    to_mcore.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP of the writing processes")
    to_hf = commands.add_parser("mcore-to-hf", help="distributed checkpoint -> HF Qwen2 directory")
    to_hf.add_argument("--input", required=True, help="checkpoint directory written by hf-to-mcore or training")
    to_hf.add_argument("--output", required=True, help="HF directory to write")
    return parser


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "hf-to-mcore":
        hf_to_mcore_command(args)
    else:
        mcore_to_hf_command(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
