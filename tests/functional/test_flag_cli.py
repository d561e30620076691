"""pretrain_puffin.py with flag mistakes: one message listing every problem, exit 2, before any process group,
data loader or model exists (the rules themselves are tested case by case in tests/unit/test_flag_mistakes.py)."""
import os
from pathlib import Path

import pytest

from megatron_puffin.camera import Camera
from megatron_puffin.data.format import PuffinRecord, ShardWriter
from megatron_puffin.data.tokenizer import train_sentencepiece_tokenizer

from helpers.puffin import RESUME_FLAGS, run_script, tiny_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flag_cli")
    for name in ("good", "broken"):
        writer = ShardWriter(root / name / "shard-00000", "main")
        writer.add(PuffinRecord(key="k", image=b"\xff\xd8", caption="c", camera=Camera(0.1, 0.2, 0.9)))
        writer.finalize()
    (root / "broken" / "shard-00000" / "manifest.json").unlink()
    train_sentencepiece_tokenizer(["a photo of a cat on a mat"] * 10, root / "tok.model", vocab_size=300)
    (root / "a_file").write_text("x")
    (root / "self.args").write_text(f"--lr 1e-4\n@{root / 'self.args'}\n")
    return root


def _cli(*flags, cwd=None, **env):
    # the real command, forked from the suite's pre-imported server (helpers.puffin.run_script)
    proc = run_script(ROOT / "pretrain_puffin.py", *flags, cwd=cwd or os.getcwd(), check=False, timeout=300,
                      env=dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="", **env))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "process group" not in proc.stderr
    return proc.stderr


def test_parallel_values_launch_flag_file_and_output_mistakes_together(files):
    stderr = _cli("--task-stream", f"image2text:{files / 'good'}:1", "--tokenizer", files / "tok.model",
                  f"@{files / 'self.args'}", "--pipeline-model-parallel-size", "0", "--lr", "inf",  # later wins
                  "--world-size", "1", "--save", files / "a_file", WORLD_SIZE="2")
    for fragment in ("--pipeline-model-parallel-size (0)", "--lr ('inf') is not a valid finite number",
                     "contradicts the launch (WORLD_SIZE=2)",
                     "includes itself", "--save", "is a file"):
        assert fragment in stderr, (fragment, stderr)


def test_dataset_frozen_task_and_schedule_mistakes_together(files):
    stderr = _cli("--task-stream", f"image2text:{files / 'broken'}:1", "--task-stream",
                  f"text2text:{files / 'good'}:1", "--freeze-llm", "--tokenizer", files / "tok.model",
                  "--train-iters", "5", "--lr-warmup-iters", "5")
    for fragment in ("shard-00000 has field files but no manifest.json", "text2text trains only the LLM",
                     "--lr-warmup-iters (5) must be smaller than --train-iters (5)"):
        assert fragment in stderr, (fragment, stderr)


def test_checkpoints_of_another_model_shape_are_named_with_every_difference():
    """--load and --pretrained-checkpoint of the shared tiny run (helpers.puffin.tiny_run) with other tower sizes:
    each checkpoint named once with every differing flag, from its puffin_meta.json, before any work."""
    stderr = _cli(*RESUME_FLAGS, "--micro-batch-size", "2", "--load", "run", "--pretrained-checkpoint",
                  "run/iter_0000002", "--hidden-size", "64", "--num-attention-heads", "8", "--vocab-size", "2048",
                  "--vision-num-layers", "2", "--dit-num-layers", "4", "--connector-num-queries", "8", cwd=tiny_run())
    differences = ("--num-attention-heads 6 (checkpoint) vs 8 (flags); --vocab-size 1024 (checkpoint) vs 2048 (flags)",
                   "--hidden-size 48 (checkpoint) vs 64 (flags)", "--vision-num-layers 1 (checkpoint) vs 2 (flags)",
                   "--connector-num-queries 4 (checkpoint) vs 8 (flags)", "--dit-num-layers 2 (checkpoint) vs 4 (flags)")
    for checkpoint in ("--load run/iter_0000004 holds a model of another shape than the flags give",
                       "--pretrained-checkpoint run/iter_0000002 holds a model of another shape than the flags give"):
        line = next((text for text in stderr.splitlines() if checkpoint in text), "")
        for fragment in differences:
            assert fragment in line, (checkpoint, fragment, stderr)
        assert "its puffin_meta.json holds them" in line
    for unchanged in ("--ffn-hidden-size", "--dit-patch-size", "--vision-hidden-size"):
        assert unchanged not in stderr, (unchanged, stderr)


def test_a_model_larger_than_the_memory_is_refused_before_the_process_group():
    """Was megatron-core's allocator traceback ("DefaultCPUAllocator: can't allocate memory: you tried to allocate
    40960000000 bytes") from inside the first layer's constructor (training.memory_check)."""
    stderr = _cli(*RESUME_FLAGS, "--hidden-size", "10000000", cwd=tiny_run())
    problem = next(line for line in stderr.splitlines() if "the model needs" in line)
    assert "GiB per process for its weights, gradients and optimizer state alone" in problem, stderr
    assert "available (memory and swap)" in problem and "--tensor-model-parallel-size" in problem, problem


def test_a_checkpoint_of_another_tokenizer_is_refused_before_any_work(files):
    """--load and --pretrained-checkpoint of the shared tiny run with another SentencePiece vocabulary (same
    --vocab-size: every shape check passes, and the embedding rows would be trained as other words)."""
    run = tiny_run()
    stderr = _cli(*RESUME_FLAGS, "--micro-batch-size", "2", "--load", "run", "--pretrained-checkpoint",
                  "run/iter_0000002", "--tokenizer", files / "tok.model", cwd=run)
    for flag, directory in (("--load", "run/iter_0000004"), ("--pretrained-checkpoint", "run/iter_0000002")):
        line = next((text for text in stderr.splitlines() if f"{flag} {directory}: it was trained" in text), "")
        assert "with the tokenizer tiny/tokenizer.model (" in line and f"not {files / 'tok.model'} (" in line, stderr
        assert line.endswith("its token ids would mean other words; give --tokenizer tiny/tokenizer.model (or a copy "
                             "of it)"), line
    assert "another shape" not in stderr, stderr


def test_a_checkpoint_given_to_the_wrong_flag_is_named_with_the_right_one(files):
    """A converted LLM (hf-to-mcore) given as --pretrained-checkpoint or --dit-checkpoint, and the shared tiny run
    given as --llm-checkpoint / --vision-checkpoint: each named with the flag it is for, before any work. Before, the
    first failed on its tensors after the process groups started, the second was loaded into nothing (the
    --pretrained-checkpoint supplied the DiT), the third said "create it with tools/convert_checkpoint.py"."""
    import importlib.util

    from helpers.llm import hf_qwen2
    from megatron_puffin.models.llm import LLMConfig

    run = tiny_run()
    config = LLMConfig(num_layers=2, hidden_size=48, ffn_hidden_size=64, num_attention_heads=6, num_query_groups=2,
                       kv_channels=8, vocab_size=1024, max_position_embeddings=2048)  # examples/tiny/model.args
    hf_qwen2(config).save_pretrained(files / "qwen_hf", safe_serialization=True)
    spec = importlib.util.spec_from_file_location("convert_checkpoint_flag_cli", ROOT / "tools" / "convert_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["hf-to-mcore", "--hf-dir", str(files / "qwen_hf"), "--output", str(files / "qwen_mcore")]) == 0
    llm = files / "qwen_mcore"
    stderr = _cli(*RESUME_FLAGS, "--micro-batch-size", "2", "--save", files / "kinds", "--pretrained-checkpoint", llm,
                  "--dit-checkpoint", llm, "--llm-checkpoint", "run/iter_0000002", "--vision-checkpoint", "run",
                  cwd=run)
    for line in (f"--pretrained-checkpoint ({llm}) holds the llm tower alone (tools/convert_checkpoint.py); give it "
                 f"as --llm-checkpoint {llm}",
                 f"--dit-checkpoint ({llm}) holds the llm tower alone (tools/convert_checkpoint.py); give it as "
                 f"--llm-checkpoint {llm}",
                 "--llm-checkpoint (run/iter_0000002) is a whole Puffin checkpoint, not a converted llm tower; start "
                 "from it with --pretrained-checkpoint run/iter_0000002",
                 "--vision-checkpoint (run) is not a distributed checkpoint (no metadata.json); it is a "
                 "pretrain_puffin.py run or checkpoint: start from it with --pretrained-checkpoint run"):
        assert f"  - {line}\n" in stderr, (line, stderr)
    assert stderr.count("  - ") == 4, stderr
    assert not (files / "kinds").exists()

    # --load of a converted tower, and of puffin-to-mcore's output (weights only): one line each, naming the flag
    # (were a shape mismatch advising --pretrained-checkpoint for the first, and schedule and data-order mismatches
    # of the stored defaults for the second)
    stderr = _cli(*RESUME_FLAGS, "--micro-batch-size", "2", "--save", files / "kinds", "--load", llm, cwd=run)
    assert stderr.count("  - ") == 1 and f"--load ({llm}) holds the llm tower alone" in stderr, stderr
    assert tool.main(["mcore-to-puffin", "--input", str(run / "run" / "iter_0000002"), "--output",
                      str(files / "Puffin-Tiny.pth")]) == 0
    assert tool.main(["puffin-to-mcore", "--puffin-checkpoint", str(files / "Puffin-Tiny.pth"), "--output",
                      str(files / "imported"), "--", f"@{ROOT / 'examples' / 'tiny' / 'model.args'}"]) == 0
    stderr = _cli(*RESUME_FLAGS, "--micro-batch-size", "2", "--save", files / "kinds", "--load", files / "imported",
                  cwd=run)
    assert stderr.count("  - ") == 1, stderr
    assert f"--load {files / 'imported'} was imported from {files / 'Puffin-Tiny.pth'} (puffin-to-mcore): it holds " \
           f"weights only, no optimizer, schedule or data position to resume; start from it with " \
           f"--pretrained-checkpoint {files / 'imported'}" in stderr, stderr


def test_a_dry_run_reports_the_paths_a_real_run_would_stop_on_and_still_succeeds(files):
    """--dry-run skips path checks (it describes a cluster configuration from any machine); run on the login node
    with a wrong stream it said nothing, and the job failed only after waiting in the queue. It now lists what a
    real run would stop on, not fatally; with good paths it says they check out."""
    flags = ["--tokenizer", files / "tok.model", "--dry-run", "--world-size", "64"]
    proc = run_script(ROOT / "pretrain_puffin.py", *flags, "--task-stream", f"image2text:{files / 'broken'}",
                      "--vision-checkpoint", files / "nowhere", check=False, timeout=300,
                      env=dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = proc.stdout[proc.stdout.index("paths on this machine: 2 problem(s)"):].splitlines()
    assert report[1].startswith(f"  - --vision-checkpoint ({files / 'nowhere'}) does not exist") or \
        report[2].startswith(f"  - --vision-checkpoint ({files / 'nowhere'}) does not exist"), report
    assert any(f"image2text:{files / 'broken'}" in line for line in report[1:3]), report
    proc = run_script(ROOT / "pretrain_puffin.py", *flags, "--task-stream", f"image2text:{files / 'good'}",
                      check=False, timeout=300, env=dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0 and "paths on this machine: the data, tokenizer, VAE files, checkpoints and output " \
        "folders the flags name all check out" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
