"""The benchmarks' flag types (``benchmarks/bench_flags.py``): a count of 0, a negative size or a device this machine
lacks is one ``error:`` line from the parser with exit status 2, checked through the benchmarks' own parsers; and the
benchmarks' reports: tiny end-to-end runs, the paired-ratio intervals and the target lines."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_flags  # noqa: E402

TASKS = ("image2text", "image2text_cross_view", "text2text", "text2image", "cam2image", "image2image")
"""The six task rows every per-task benchmark prints."""


def test_types_accept_what_they_should_and_name_what_is_wrong():
    import argparse

    assert bench_flags.positive_int("3") == 3 and bench_flags.nonnegative_int("0") == 0
    assert bench_flags.available_device("cpu") == "cpu"
    assert bench_flags.synthetic_image_size("96") == 96 and bench_flags.synthetic_image_size("512") == 512
    assert bench_flags.synthetic_num_samples("4") == 4
    assert bench_flags.int_list(0)("0, 2") == [0, 2]
    assert bench_flags.choice_list(("a", "b"))("b,a,b") == ["b", "a"]
    assert bench_flags.lever_list(("a", "b"))("all") == ["a", "b"] and bench_flags.lever_list(("a",))("none") == []
    assert bench_flags.lever_list(("a", "b"))("b") == ["b"]
    assert bench_flags.nonnegative_float("0") == 0.0 and bench_flags.nonnegative_float("1e-4") == 1e-4
    for kind, text, message in ((bench_flags.positive_int, "0", "0 must be at least 1"),
                                (bench_flags.synthetic_image_size, "64", "64 must be at least 96"),
                                (bench_flags.synthetic_image_size, "8192", "8192 must be at most 4096"),
                                (bench_flags.synthetic_image_size, "112", "112 must be a multiple of 32"),
                                (bench_flags.nonnegative_int, "-1", "-1 must be at least 0"),
                                (bench_flags.positive_int, "2.5", "'2.5' is not a whole number"),
                                (bench_flags.available_device, "tpu", "'tpu' is not a torch device"),
                                (bench_flags.available_device, "mps", "the benchmarks run on cpu or cuda"),
                                (bench_flags.synthetic_num_samples, "3", r"3 must be at least 4 \(the cross-view"),
                                (bench_flags.int_list(0), "0,,2", "is not a comma list of whole numbers"),
                                (bench_flags.int_list(1), "1,0", "0 must be at least 1"),
                                (bench_flags.choice_list(("a", "b")), "a,c", "unknown c; give a comma list of a, b"),
                                (bench_flags.choice_list(("a", "b")), ",", "empty list"),
                                (bench_flags.lever_list(("a", "b")), ",", "empty list; give all, none or a comma"),
                                (bench_flags.lever_list(("a",)), "a,b",
                                 "unknown b; give all, none or a comma list of a$"),
                                (bench_flags.nonnegative_float, "-1e-4", "-1e-4 must be a finite number >= 0"),
                                (bench_flags.nonnegative_float, "nan", "nan must be a finite number >= 0"),
                                (bench_flags.nonnegative_float, "tiny", "'tiny' is not a number")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            kind(text)


def test_benchmark_parsers_refuse_with_one_line(monkeypatch, capsys):
    import warnings

    import torch

    with warnings.catch_warnings():  # both benchmarks silence every warning when imported: keep that local
        import bench_data_loader
        import bench_dit
        import bench_puffin
        import bench_micro_batches
        import bench_ours_ab
        import bench_task_order
        import bench_training
        import profile_training

    cases = [(bench_training._parse_args, ["--threads", "0"], "argument --threads: 0 must be at least 1"),
             (bench_training._parse_args, ["--blocks", "0"], "argument --blocks: 0 must be at least 1"),
             (bench_training._parse_args, ["--image-size", "64"], "argument --image-size: 64 must be at least 96"),
             (bench_training._parse_args, ["--num-samples", "2"], "argument --num-samples: 2 must be at least 4"),
             (bench_training._parse_args, ["--loss-tolerance", "nan"], "argument --loss-tolerance: nan must be"),
             (bench_training._parse_args, ["--levers", "compile,bogus"], "argument --levers: unknown bogus; give"),
             (bench_puffin._parse_args, ["--levers", "cached-latents"], "unknown cached-latents; give all, none or"),
             (bench_dit._parse_args, ["--latent-size", "7"], "--latent-size (7) must be divisible by the patch size"),
             (bench_dit._parse_args, ["--repeats", "-2"], "argument --repeats: -2 must be at least 1"),
             (profile_training._parse_args, ["--tasks", "text2txt"], "argument --tasks: unknown text2txt"),
             (bench_micro_batches._parse_args, ["--bootstrap", "0"], "argument --bootstrap: 0 must be at least 1"),
             (bench_micro_batches._parse_args, ["--tasks", "img2text"], "argument --tasks: unknown img2text"),
             (bench_micro_batches._parse_args, ["--turns", "2", "--blocks", "x"], "argument --blocks: 'x' is not a"),
             (bench_ours_ab._parse_args, ["--levers", "none"], "the following arguments are required: --compare"),
             (bench_task_order._parse_args, ["--task", "img2text"], "argument --task: invalid choice: 'img2text'"),
             (bench_task_order._parse_args, ["--turns", "0"], "argument --turns: 0 must be at least 1"),
             (bench_data_loader.main, ["--loader-workers", "0,x"], "argument --loader-workers: 'x' is not a whole"),
             (bench_data_loader.main, ["--num-samples", "8"], "--num-samples (8) must be at least 24"),
             (bench_data_loader.main, ["--work-dir", "/proc/puffin"], "--work-dir (/proc/puffin): the folder /proc is")]
    if not torch.cuda.is_available():
        cases.append((bench_dit._parse_args, ["--device", "cuda"], "no usable CUDA device (use cpu)"))
    for parse, argv, message in cases:
        monkeypatch.setattr(sys, "argv", ["bench", *argv])
        with pytest.raises(SystemExit) as stopped:
            parse()
        assert stopped.value.code == 2 and message in capsys.readouterr().err, argv


def test_scripts_built_on_bench_training_list_their_own_flags_in_help(monkeypatch, capsys):
    """profile_training, bench_micro_batches and bench_ours_ab take bench_training's flags plus their own: --help
    lists both (their own flags were parsed aside once, and missing from --help), and both parse together."""
    import warnings

    with warnings.catch_warnings():
        import bench_micro_batches
        import bench_ours_ab
        import bench_task_order
        import profile_training

    for module, own in ((profile_training, ["--top", "--tasks"]), (bench_micro_batches, ["--turns", "--bootstrap", "--tasks"]),
                        (bench_ours_ab, ["--compare", "--repeats"]), (bench_task_order, ["--task", "--turns"])):
        monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", "--help"])
        with pytest.raises(SystemExit) as stopped:
            module._parse_args()
        text = capsys.readouterr().out
        assert stopped.value.code == 0 and all(flag in text for flag in own + ["--blocks", "--levers"]), module
        assert text.startswith(f"usage: {module.__name__}.py")
        assert " ".join(module.__doc__.split("\n")[0].split()) in " ".join(text.split())  # its own description
    monkeypatch.setattr(sys, "argv", ["bench_micro_batches.py", "--turns", "3", "--levers", "none", "--blocks", "4"])
    args = bench_micro_batches._parse_args()
    assert (args.turns, args.bootstrap, args.levers, args.blocks) == (3, 2000, [], 4)


def test_size_presets_refuse_conflicts_in_one_line(monkeypatch):
    import warnings

    import torch

    with warnings.catch_warnings():
        import bench_training

    cases = [(["--full-size", "--real-proportions"], "--real-proportions and --full-size are 2 size presets"),
             (["--host-bound", "--real-proportions"], "--real-proportions and --host-bound are 2 size presets"),
             (["--depth-divisor", "2"], "--depth-divisor applies to --full-size and --host-bound only")]
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


def _run_benchmark(tmp_path, script: str, *flags: str):
    """``benchmarks/<script> FLAGS`` as a CPU command from the repository root; asserts it exited 0."""
    import os
    import subprocess

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONHASHSEED="0", CUDA_VISIBLE_DEVICES="", TMPDIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, str(root / "benchmarks" / script), *flags], capture_output=True,
                            text=True, env=env, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_host_bound_preset_runs_both_sides_on_every_task(tmp_path):
    """``bench_micro_batches.py --host-bound``: the --full-size layer structure at tiny widths builds, both sides
    train one micro-batch of each of the six tasks, and the table names every task (a CPU run, any host)."""
    result = _run_benchmark(tmp_path, "bench_micro_batches.py", "--host-bound", "--depth-divisor", "8", "--turns", "1",
                            "--warmup-steps", "1", "--num-samples", "8", "--clock", "cpu")
    lines = result.stdout.splitlines()
    assert "levers: none" in lines[0] and lines[1].startswith("host-bound: the operators of --full-size"), lines
    assert "ours without fused weight-gradient accumulation" in lines[1]
    rows = {line.split()[0]: line.split() for line in lines[3:9]}
    assert set(rows) == set(TASKS)
    assert all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows.values())
    for row in rows.values():  # one turn: the paired ratio is the ratio, and its interval is that one value
        low, high = (float(x) for x in row[5].split("-"))
        assert float(row[4]) == float(row[3]) and low == high == float(row[4]), row
        verdict = "ours faster" if low > 1.0 else "ours slower" if low < 1.0 else "cannot tell apart"
        assert " ".join(row[6:6 + len(verdict.split())]) == verdict, row
    assert lines[-1].startswith("geometric mean reference/ours:")


def test_micro_batch_benchmark_times_only_the_tasks_asked_for(tmp_path):
    result = _run_benchmark(tmp_path, "bench_micro_batches.py", "--host-bound", "--depth-divisor", "8", "--turns", "2",
                            "--warmup-steps", "1", "--num-samples", "8", "--clock", "cpu", "--tasks", "text2text")
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[3:-1]] == ["text2text"], lines


def test_task_order_benchmark_moves_only_the_task_and_reports_both_sides(tmp_path):
    """``bench_task_order.py``: the two orders hold the same micro-batches, the task first or third and the others
    in their order; a tiny run prints both sides' times, first / third ratio, interval and verdict, and the shift of
    bench_training's ratio."""
    import bench_task_order

    cycle = [{"task": task} for task in TASKS]
    arranged = bench_task_order.orders(cycle, "text2image")
    assert [b["task"] for b in arranged["first"]] == ["text2image", *TASKS[:3], *TASKS[4:]]
    assert [b["task"] for b in arranged["third"]] == [*TASKS[:2], "text2image", TASKS[2], *TASKS[4:]]
    with pytest.raises(ValueError, match="holds 2 micro-batches of text2text"):
        bench_task_order.orders(cycle + [{"task": "text2text"}], "text2text")
    result = _run_benchmark(tmp_path, "bench_task_order.py", "--host-bound", "--depth-divisor", "8", "--turns", "2",
                            "--warmup-steps", "1", "--num-samples", "8", "--clock", "cpu", "--task", "text2text")
    lines = result.stdout.splitlines()
    assert "text2text's forward+backward first in the optimizer step vs third, 2 turns" in lines[0], lines
    rows = {line.split()[0]: line.split() for line in lines if line.split()[0] in ("ours", "reference")}
    assert set(rows) == {"ours", "reference"}
    for row in rows.values():
        first, third, ratio = (float(x) for x in row[1:4])
        low, high = (float(x) for x in row[4].split("-"))
        assert first > 0 and third > 0 and low <= ratio <= high, row
        assert " ".join(row[5:]) == bench_task_order.verdict(low, high), row
    assert lines[-1].startswith("text2text first moves bench_training's ours/reference ratio by "), lines
    shift = float(lines[-1].split(" by ")[1].split("x")[0])
    assert shift == pytest.approx(float(rows["reference"][3]) / float(rows["ours"][3]), abs=2e-3)  # printed rounded


def test_puffin_benchmark_times_both_models_on_every_task(tmp_path):
    """``bench_puffin.py`` end to end at tiny sizes: both models' losses agree before timing, and every task's row
    carries both times, the ratio, the paired ratio with its interval and a verdict (two turns)."""
    tiny = ["--repeats", "2", "--warmup", "0", "--num-samples", "8", "--image-size", "96", "--micro-batch-size", "1",
            "--llm-layers", "1", "--llm-hidden", "64", "--llm-heads", "2", "--llm-kv-heads", "1", "--llm-ffn", "128",
            "--vision-layers", "1", "--vision-hidden", "64", "--vision-heads", "2", "--connector-layers", "1",
            "--connector-hidden", "64", "--connector-heads", "2", "--dit-layers", "1", "--dit-heads", "2",
            "--dit-head-dim", "16", "--num-queries", "8"]
    lines = _run_benchmark(tmp_path, "bench_puffin.py", *tiny).stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in TASKS}
    assert set(rows) == set(TASKS), lines
    for row in rows.values():
        ours_ms, ref_ms, ratio, paired = (float(x) for x in row[4:8])
        low, high = (float(x) for x in row[8].split("-"))
        assert float(row[3]) <= 1e-5 and ours_ms > 0 and ref_ms > 0 and low <= paired <= high, row
        # the printed times are rounded to 0.1 ms: the ratio lies between what their rounding allows
        assert (ref_ms - 0.05) / (ours_ms + 0.05) - 1e-3 <= ratio <= (ref_ms + 0.05) / (ours_ms - 0.05) + 1e-3, row
        assert " ".join(row[9:]) in ("ours faster", "ours slower", "cannot tell apart"), row
    assert lines[-1].startswith("overall ours/reference: "), lines


def test_median_interval_is_a_seeded_percentile_bootstrap():
    """The interval the benchmarks print for paired ratios: ordered, around the sample median, as wide as the
    spread allows, the same on a rerun, one point for identical values; and what each interval says."""
    from puffin_bench_common import median_interval, paired_verdict

    values = [0.9, 0.95, 1.0, 1.02, 1.05, 1.1, 0.97, 1.01]
    low, high = median_interval(values, 2000)
    assert min(values) <= low <= 1.0 <= high <= max(values) and low < high
    assert median_interval(values, 2000) == (low, high)
    assert median_interval([1.2] * 5, 100) == (1.2, 1.2)
    narrow = median_interval([1.0 + 0.001 * i for i in range(40)], 2000)
    assert narrow[1] - narrow[0] < high - low
    assert [paired_verdict(*interval) for interval in ((low, high), (1.01, 1.2), (0.8, 0.99), (1.0, 1.0))] == \
        ["cannot tell apart", "ours faster", "ours slower", "cannot tell apart"]


def test_targets_are_the_ones_of_the_run_s_setting(capsys):
    """CPU presets print issue 14's CPU targets, --full-size the GPU one (1.2x, no MFU target), --host-bound none."""
    import warnings
    from types import SimpleNamespace

    with warnings.catch_warnings():
        import bench_training

    medians = {"ours": {"image2text": 1.25, "all": 1.25, "mfu": 0.5}, "reference": {"image2text": 1.0, "all": 1.0}}

    def targets(**preset):
        args = SimpleNamespace(levers=["compile"], host_bound=False, full_size=False, real_proportions=False)
        vars(args).update(preset)
        bench_training._print_targets(args, medians, ["image2text"], 0.9)
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("target")]

    cpu = targets(real_proportions=True)
    assert [line.split("  ")[0] for line in cpu] == ["target overall >= 1.3x (levers on)",
                                                     "target MFU >= 60 % of the matmul rate", "target memory <= reference"]
    assert "NOT met (overall 1.25" in cpu[0] and "NOT met (50.0 %)" in cpu[1] and "met (0.90x)" in cpu[2]
    gpu = targets(full_size=True)
    assert len(gpu) == 2 and "overall >= 1.2x (GPU)" in gpu[0] and " met (overall 1.25" in gpu[0]
    assert targets(host_bound=True) == ["targets: not evaluated (--host-bound measures the host's cost per operator; "
                                        "the targets are for --real-proportions on a CPU and --full-size on a GPU)"]


def test_inference_benchmark_runs_with_the_sizes_it_derives(tmp_path):
    """``bench_inference.py`` with the model sizes it derives itself (a run once stopped on a size left None): both
    decoders give the same tokens and both image pipelines run (one prompt, two tokens, one image, one step)."""
    result = _run_benchmark(tmp_path, "bench_inference.py", "--prompts", "1", "--new-tokens", "2", "--images", "1",
                            "--steps", "1", "--repeats", "1", "--num-samples", "8")
    assert "tokens identical to transformers: True" in result.stdout, result.stdout
    assert "ratio reference / ours" in result.stdout.splitlines()[-1], result.stdout


def test_cross_entropy_benchmark_checks_ours_bit_identical_and_times_every_variant(tmp_path):
    """``bench_cross_entropy.py``: it refuses to time variants that compute other numbers (ours and megatron-core's
    helpers must be bit-identical to ``vocab_parallel_cross_entropy``; the run exits non-zero otherwise), then
    prints one timed row per variant with its ratio to megatron-core's function."""
    result = _run_benchmark(tmp_path, "bench_cross_entropy.py", "--rows", "9", "--vocab", "37", "--repeats", "3")
    lines = result.stdout.splitlines()
    assert "9 rows x vocabulary 37" in lines[0] and "bit-identical to megatron-core" in lines[0], lines
    rows = {line.split("  ")[1].strip(): line for line in lines[1:]}
    assert set(rows) == {"megatron-core", "helpers, torch.max", "ours", "F.cross_entropy"}, lines
    assert rows["megatron-core"].rstrip().endswith("1.00")


def test_block_ratios_pair_the_two_sides_blocks_by_index():
    """``bench_training._block_ratios``: per task, ours / reference of block i of each side (the blocks that
    trained the same micro-batches), so a run prints the spread its median ratio carries."""
    import warnings

    with warnings.catch_warnings():
        import bench_training

    blocks = {"ours": [{"text2text": 2.0, "all": 1.0}, {"text2text": 3.0, "all": 1.5}],
              "reference": [{"text2text": 4.0, "all": 1.0}, {"text2text": 2.0, "all": 1.0}]}
    assert bench_training._block_ratios(blocks) == {"text2text": [0.5, 1.5], "all": [1.0, 1.5]}


def test_target_lines_name_the_slowest_task(capsys):
    """The levers-off target line says which task is lowest, not only its ratio."""
    import argparse
    import warnings

    with warnings.catch_warnings():
        import bench_training

    args = argparse.Namespace(levers=[], host_bound=False, full_size=False)
    medians = {"ours": {"image2text": 0.96, "text2text": 1.10, "all": 1.14, "mfu": 0.61},
               "reference": {"image2text": 1.0, "text2text": 1.0, "all": 1.0}}
    bench_training._print_targets(args, medians, ["image2text", "text2text"], 0.68)
    out = capsys.readouterr().out
    assert "target every task >= 1.0x (levers off)    NOT met (overall 1.14, lowest task image2text 0.96)" in out
    assert "target MFU >= 60 % of the matmul rate     met (61.0 %)" in out
    assert "target memory <= reference                met (0.68x)" in out


def test_speed_targets_are_also_asked_of_the_paired_block_ratios(capsys):
    """With the single blocks' ratios, each speed target line is followed by the paired answer: the lowest task's
    (levers off) or the whole steps' (levers on) median block ratio, its 95 % interval and what that says."""
    import argparse
    import warnings

    with warnings.catch_warnings():
        import bench_training

    medians = {"ours": {"image2text": 0.96, "text2text": 1.10, "all": 1.14, "mfu": 0.61},
               "reference": {"image2text": 1.0, "text2text": 1.0, "all": 1.0}}
    blocks = {"image2text": [0.9, 1.05, 0.98, 1.02, 1.01, 0.97], "text2text": [1.2, 1.1, 1.15, 1.3, 1.12, 1.18],
              "all": [1.31, 1.35, 1.33, 1.4, 1.32, 1.36]}
    bench_training._print_targets(argparse.Namespace(levers=[], host_bound=False, full_size=False), medians,
                                  ["image2text", "text2text"], 0.68, blocks)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("target every task >= 1.0x (levers off)    NOT met (overall 1.14")
    assert lines[2].strip().startswith("paired block ratios: lowest task image2text 0.995 (95 % interval 0.9")
    assert lines[2].endswith(", cannot tell apart)") and lines[3].startswith("target MFU")
    bench_training._print_targets(argparse.Namespace(levers=["all"], host_bound=False, full_size=False), medians,
                                  ["image2text", "text2text"], 0.68, blocks)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].strip().startswith("paired block ratios: whole steps 1.340 (95 % interval 1.3")
    low, high = (float(x) for x in lines[2].split("interval ")[1].split(",")[0].split("-"))
    assert 1.0 < low < 1.34 < high <= 1.4 and lines[2].endswith(", ours faster)")
