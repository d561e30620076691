"""argparse types the benchmarks share, so that a count of 0, a negative size or a device this machine lacks is one
``error:`` line from the parser (exit status 2) instead of a traceback from deep inside the run; and
:func:`run_main`, the benchmarks' entry point, so that Ctrl-C or a scheduler's SIGTERM ends one with one line after
its temporary data is removed."""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable, NoReturn, Optional


def positive_int(text: str) -> int:
    """A whole number >= 1 (sizes, counts, repeats, threads)."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """A whole number >= 0 (warm-up steps, optional counts)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, lowest: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"{value} must be at least {lowest}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (tolerances): ``nan`` would make every comparison fail, a negative one every check."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def int_list(lowest: int):
    """A comma list of whole numbers, each >= ``lowest`` (worker counts to sweep: ``0,2``)."""

    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",")]
        if not all(items):
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of whole numbers (e.g. 0,2)")
        return [_int_at_least(item, lowest) for item in items]

    return parse


def choice_list(choices, words: Optional[dict] = None):
    """A comma list of names out of ``choices`` (no repeats), e.g. the tasks to profile; ``words`` maps whole
    answers (``all``, ``none``) to their lists."""
    words = words or {}

    def parse(text: str) -> list:
        if text.strip() in words:
            return list(words[text.strip()])
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in choices]
        if unknown or not names:
            also = f"{', '.join(words)} or " if words else ""
            raise argparse.ArgumentTypeError(f"{'unknown ' + ', '.join(unknown) if unknown else 'empty list'}; "
                                             f"give {also}a comma list of {', '.join(choices)}")
        return list(dict.fromkeys(names))

    return parse


def lever_list(levers):
    """``--levers``: ``all`` (every one of ``levers``), ``none``, or a comma list out of ``levers``."""
    return choice_list(levers, {"all": levers, "none": ()})


def synthetic_image_size(text: str) -> int:
    """The side of the benchmarks' synthetic images: what ``tools/make_synthetic_dataset.py`` accepts, [96, 4096]
    (preprocessing rejects images of 80 pixels or less), and a multiple of the training's ``--image-size-unit``
    (32, the default the benchmarks train with)."""
    from megatron_puffin.data.synthetic import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

    value = _int_at_least(text, MIN_IMAGE_SIZE)
    if value > MAX_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"{value} must be at most {MAX_IMAGE_SIZE}")
    if value % 32:
        raise argparse.ArgumentTypeError(f"{value} must be a multiple of 32 (the training's --image-size-unit), "
                                         f"e.g. {max(MIN_IMAGE_SIZE, value // 32 * 32)}")
    return value


def synthetic_num_samples(text: str) -> int:
    """The benchmarks' ``--num-samples``: at least ``CROSS_VIEW_DIVISOR`` (4), so that the synthetic generator's
    ``N // 4`` cross-view pairs (the image2text_cross_view and image2image streams) are not empty."""
    from megatron_puffin.data.synthetic import CROSS_VIEW_DIVISOR

    try:
        return _int_at_least(text, CROSS_VIEW_DIVISOR)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error} (the cross-view streams get N // {CROSS_VIEW_DIVISOR} "
                                         "pairs)") from None


def available_device(text: str) -> str:
    """A torch device string this machine has (``cpu``, ``cuda``, ``cuda:1``)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device ({error})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no usable CUDA device (use cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: the benchmarks run on cpu or cuda")
    return text


def run_main(main: Callable[[], Optional[int]], kept: str = "no result; its temporary data was removed") -> NoReturn:
    """Run a benchmark's ``main`` and exit with its status (None: 0). Ctrl-C, SIGTERM (``timeout``, ``scancel``)
    and SIGHUP raise in the main thread, so its ``with tempfile.TemporaryDirectory()`` blocks remove their data on
    the way out; then one line, exit status 130 or 128 + the signal. Under SIGTERM's default action the process
    ended at once and left its synthetic dataset, shards and cached latents in the temporary folder. ``kept``: what
    the one line says is left."""
    from megatron_puffin.process_lifetime import exit_on_ctrl_c, exit_process

    prog = os.path.basename(sys.argv[0])
    exit_process(exit_on_ctrl_c(prog, lambda: main() or 0, kept))
