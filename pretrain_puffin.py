"""Train Puffin on megatron-core: parse flags -> validate -> build -> train.

    torchrun --nproc-per-node 2 pretrain_puffin.py @examples/tiny/stage2_sft.args
    python pretrain_puffin.py --dry-run @examples/stages/stage2_sft.args --world-size 64

This file only wires things together; the pieces live in ``megatron_puffin``.
"""
from __future__ import annotations

import logging
import sys
import warnings

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
warnings.filterwarnings("ignore", message="Apex is not installed")

from megatron_puffin.config import ConfigError, parse_args  # noqa: E402

logger = logging.getLogger("pretrain_puffin")


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except ConfigError as error:
        print(f"pretrain_puffin.py: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.logging.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.dry_run:
        from megatron_puffin.training.layout import describe

        print(describe(args))
        return 0
    print(
        "pretrain_puffin.py: the configuration is valid, but the training loop is not built yet (issue 7); "
        "use --dry-run to inspect the layout",
        file=sys.stderr,
    )
    return 3


if __name__ == "__main__":
    sys.exit(main())
