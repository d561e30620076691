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


def test_size_presets_refuse_conflicts_in_one_line(monkeypatch):
    import warnings

    import torch

    with warnings.catch_warnings():
        import bench_training

    cases = [(["--full-size", "--real-proportions"], "two size presets; give one"),
             (["--depth-divisor", "2"], "--depth-divisor applies to --full-size only")]
    if not torch.cuda.is_available():
        cases.append((["--full-size"], "--full-size needs a CUDA GPU"))
    for argv, message in cases:
        monkeypatch.setattr(sys, "argv", ["bench_training.py", *argv])
        with pytest.raises(SystemExit) as stopped:
            bench_training._parse_args()
        assert message in str(stopped.value), argv


def test_bf16_reference_trainer_updates_fp32_masters_as_deepspeed_does():
    """The reference's bf16 mode: AdamW + clipping on fp32 master weights, copied back into the bf16 weights.
    An update too small for bf16 (1e-5 of a weight near 1) must survive in the masters and accumulate."""
    import warnings
    from types import SimpleNamespace

    import torch

    with warnings.catch_warnings():
        import bench_training

    training = SimpleNamespace(weight_decay=0.05, lr=1e-5, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
                               clip_grad=1.0, lr_warmup_iters=0, train_iters=1000)
    torch.manual_seed(0)
    fp32 = torch.nn.Linear(8, 8)
    with torch.no_grad():
        fp32.weight.add_(1.0)
    bf16 = torch.nn.Linear(8, 8).to(torch.bfloat16)
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in fp32.state_dict().items()})
    fp32.load_state_dict({k: v.float() for k, v in bf16.state_dict().items()})  # same starting values
    ours, plain = bench_training.ReferenceTrainer(bf16, training), bench_training.ReferenceTrainer(fp32, training)
    assert ours.masters is not None and plain.masters is None
    start = bf16.weight.detach().float().clone()
    for step in range(3):
        grads = [torch.randn(8, 8).bfloat16().float(), torch.randn(8).bfloat16().float()]  # bf16-representable
        for model, trainer in ((bf16, ours), (fp32, plain)):
            trainer.optimizer.zero_grad(set_to_none=True)
            for param, grad in zip(model.parameters(), grads):
                param.grad = grad.to(param.dtype)
            trainer.update()
        # masters follow the fp32 run exactly (same bf16-representable gradients); the weights are their bf16 copy
        for master, param in zip(ours.masters, fp32.parameters()):
            torch.testing.assert_close(master, param.detach(), rtol=0, atol=0)
        for master, param in zip(ours.masters, bf16.parameters()):
            assert torch.equal(param.detach(), master.to(torch.bfloat16))
    assert not torch.equal(ours.masters[0], start)  # the small updates were kept in fp32


def test_out_of_memory_while_building_or_training_is_one_line(monkeypatch):
    """Both variants are held at once: running out of memory says so and names the flag to change."""
    import warnings

    import torch

    with warnings.catch_warnings():
        import bench_training

    def out_of_memory(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bench_training, "run", out_of_memory)
    monkeypatch.setattr(sys, "argv", ["bench_training.py", "--micro-batch-size", "8"])
    threads = torch.get_num_threads()  # main() sets --threads for the process
    try:
        with pytest.raises(SystemExit) as stopped:
            bench_training.main()
    finally:
        torch.set_num_threads(threads)
    assert "ran out of memory holding both variants at once; use smaller sizes or --micro-batch-size" in \
        str(stopped.value)
