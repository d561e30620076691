"""The benchmarks' flag types (``benchmarks/bench_flags.py``): a count of 0, a negative size or a device this machine
lacks is one ``error:`` line from the parser with exit status 2, checked through two benchmarks' own parsers."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_flags  # noqa: E402


def test_types_accept_what_they_should_and_name_what_is_wrong():
    import argparse

    assert bench_flags.positive_int("3") == 3 and bench_flags.nonnegative_int("0") == 0
    assert bench_flags.available_device("cpu") == "cpu"
    for kind, text, message in ((bench_flags.positive_int, "0", "0 must be at least 1"),
                                (bench_flags.nonnegative_int, "-1", "-1 must be at least 0"),
                                (bench_flags.positive_int, "2.5", "'2.5' is not a whole number"),
                                (bench_flags.available_device, "tpu", "'tpu' is not a torch device"),
                                (bench_flags.available_device, "mps", "the benchmarks run on cpu or cuda")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            kind(text)


def test_benchmark_parsers_refuse_with_one_line(monkeypatch, capsys):
    import warnings

    import torch

    with warnings.catch_warnings():  # both benchmarks silence every warning when imported: keep that local
        import bench_dit
        import bench_training

    cases = [(bench_training._parse_args, ["--threads", "0"], "argument --threads: 0 must be at least 1"),
             (bench_training._parse_args, ["--blocks", "0"], "argument --blocks: 0 must be at least 1"),
             (bench_dit._parse_args, ["--repeats", "-2"], "argument --repeats: -2 must be at least 1")]
    if not torch.cuda.is_available():
        cases.append((bench_dit._parse_args, ["--device", "cuda"], "no usable CUDA device (use cpu)"))
    for parse, argv, message in cases:
        monkeypatch.setattr(sys, "argv", ["bench", *argv])
        with pytest.raises(SystemExit) as stopped:
            parse()
        assert stopped.value.code == 2 and message in capsys.readouterr().err, argv
