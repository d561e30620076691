"""Every shell command in a fenced code block of README.md and docs/*.md works as written, so the docs cannot drift.

Each command (backslash continuations joined, ``&&`` chains split, comments dropped) is one of:

* **run**: ``pretrain_puffin.py --help`` / ``--dry-run`` and ``--help`` of a tool run in this process, as written
  (from the repository root), and must succeed;
* **validated**: a command that needs real weights, data or GPUs is checked by the program's own parser: a
  ``pretrain_puffin.py`` training command is dry-run (``--dry-run``, world size from its torchrun options), a tool
  command's flags are parsed by the tool's parser (``convert_checkpoint.py``'s model flags after ``--`` too);
* **marked**: anything else (shell scripts, Slurm, installs) must carry a reason, either an HTML comment
  ``<!-- docs-test: skip (reason) -->`` right above its code block or an entry of :data:`MARKED` below; every
  repository path it names must still exist.

Python blocks are library examples, not commands, and are not collected here.
"""
import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"", "bash", "sh", "shell", "console"}
COMMAND_WORDS = {"python", "python3", "torchrun", "bash", "source", "sbatch", "srun", "pip", "mkdir", "cd", "module"}
# Commands that cannot run here, by program (after environment assignments), with the reason.
MARKED = {
    "bash examples/quickstart.sh": "the whole four-stage tiny training (minutes); run by hand and by CI separately",
    "bash tests/run.sh": "the test suite itself",
    "bash examples/train.sh": "a full-scale stage on 8 GPUs (its behaviour: tests/unit/test_launchers.py)",
    "sbatch examples/slurm/train.sbatch": "needs Slurm (its behaviour: tests/unit/test_launchers.py with stand-ins)",
    "bash benchmarks/gpu_check.sh": "needs a CUDA GPU (the GPU correctness and speed check)",
    "bash benchmarks/gpu_bench.sh": "needs a CUDA GPU (the full-size speed benchmarks)",
}
SKIP_MARKER = re.compile(r"<!--\s*docs-test:\s*skip\s*\((.+?)\)\s*-->")
BLOCK = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```", re.S | re.M)
COMMAND_START = re.compile(r"^([A-Z_][A-Z0-9_]*=\S*\s+)*(" + "|".join(sorted(COMMAND_WORDS)) + r")\s")
REPO_PATH = re.compile(r"^@?((?:examples|tools|docs|tests|benchmarks|megatron_puffin)/[\w./-]+|[\w-]+\.py)$")


@dataclass
class Command:
    source: str  # file:line
    text: str
    words: List[str]  # shell words without leading VAR=value assignments
    env: dict
    marker: Optional[str]  # reason of the block's skip marker


def _commands_of(path: Path) -> List[Command]:
    text = path.read_text()
    found = []
    for block in BLOCK.finditer(text):
        if block.group(1) not in SHELL_LANGUAGES:
            continue
        before = text[:block.start()].rstrip().splitlines()
        marker = SKIP_MARKER.fullmatch(before[-1].strip()) if before else None
        line_number = text[:block.start()].count("\n") + 2
        body = re.sub(r"\\\n\s*", " ", block.group(2))  # continuation lines
        for offset, line in enumerate(body.splitlines()):
            for part in line.split(" && "):
                if not COMMAND_START.match(part.strip()):
                    continue  # prose, trees and diagrams inside untyped blocks
                words = shlex.split(part, comments=True)
                env = {}
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                    key, _, value = words.pop(0).partition("=")
                    env[key] = value
                if words and words[0] in COMMAND_WORDS:
                    found.append(Command(f"{path.relative_to(ROOT)}:{line_number + offset}", part.strip(), words, env,
                                         marker.group(1) if marker else None))
    return found


ALL = [command for path in DOCS for command in _commands_of(path)]


def _load(relative: str, name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _program(words: List[str]):
    """(script, its arguments, torchrun options) of a ``python X.py`` / ``torchrun [opts] X.py`` /
    ``python -m megatron_puffin.launch [opts] X.py`` command."""
    if words[0] in ("python", "python3") and len(words) > 1 and words[1].endswith(".py"):
        return words[1], words[2:], []
    start = 1 if words[0] == "torchrun" else 3 if words[1:3] == ["-m", "megatron_puffin.launch"] else None
    if start is not None:
        for index, word in enumerate(words[start:], start=start):
            if word.endswith(".py"):
                return word, words[index + 1:], words[start:index]
    return None, [], []


def _world_size(torchrun_options: List[str]) -> Optional[int]:
    sizes = {}
    for flag in ("--nproc-per-node", "--nnodes"):
        if flag in torchrun_options:
            value = torchrun_options[torchrun_options.index(flag) + 1]
            if value.isdigit():
                sizes[flag] = int(value)
    return sizes.get("--nproc-per-node", 1) * sizes.get("--nnodes", 1) if sizes else None


def _pretrain(args: List[str], torchrun_options: List[str]) -> str:
    main = _load("pretrain_puffin.py", "pretrain_puffin_docs").main
    out = io.StringIO()
    if "--help" in args:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
            main(args)
        assert done.value.code == 0 and "--tensor-model-parallel-size" in out.getvalue()
        return "ran"
    how = "ran"
    if "--dry-run" not in args:  # a training command: its flags are dry-run at the launch's world size
        world = _world_size(torchrun_options)
        args = [*args, "--dry-run", *(["--world-size", str(world)] if world and "--world-size" not in args else [])]
        how = "validated (dry run)"
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()) as err:
        code = main(args)
    assert code == 0, err.getvalue()
    assert "parallel layout:" in out.getvalue()
    return how


def _convert(args: List[str]) -> str:
    tool = _load("tools/convert_checkpoint.py", "convert_checkpoint_docs")
    parser = tool.build_parser()
    if "--help" in args:
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as done:
            parser.parse_args(args)
        assert done.value.code == 0
        return "ran"
    parsed, extra = parser.parse_known_args(args)
    if parsed.command in tool.FLAG_COMMANDS:
        tool.pretrain_flags(extra, parsed.command)  # the model flags after '--' parse (files need not exist)
    else:
        assert not extra, f"unrecognised arguments {extra}"
    return "validated (parser)"


MODEL_FLAG_TOOLS = {"tools/understand.py", "tools/generate.py"}  # their unknown --flags are pretrain_puffin.py flags


def _model_flags_exist(flags: List[str]) -> None:
    from megatron_puffin.config.parser import build_parser as build_pretrain_parser

    known = build_pretrain_parser()._option_string_actions
    for flag in (f.split("=", 1)[0] for f in flags if f.startswith("--")):
        assert flag in known, f"{flag} is neither a flag of the tool nor of pretrain_puffin.py"


def _plain_tool(script: str, args: List[str]) -> str:
    parser = _load(script, Path(script).stem + "_docs").build_parser()
    if script in MODEL_FLAG_TOOLS and "--help" not in args:
        _, model_flags = parser.parse_known_args(args)
        _model_flags_exist(model_flags)
        return "validated (parser)"
    if "--help" in args:
        with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as done:
            parser.parse_args(args)
        assert done.value.code == 0
        return "ran"
    parser.parse_args(args)
    return "validated (parser)"


TOOLS = {"tools/preprocess_data.py", "tools/make_synthetic_dataset.py", "tools/plot_metrics.py", "tools/understand.py",
         "tools/generate.py", "tools/evaluate_camera.py", "tools/cache_latents.py", "tools/check_data.py",
         "examples/inspect_batches.py"}


def _check(command: Command) -> str:
    script, args, torchrun_options = _program(command.words)
    if script == "pretrain_puffin.py":
        return _pretrain(args, torchrun_options)
    if script == "tools/convert_checkpoint.py":
        return _convert(args)
    if script in TOOLS:
        return _plain_tool(script, args)
    script = next((w for w in command.words[1:] if w.endswith((".sh", ".sbatch"))), command.words[1:2] or [""])
    program = f"{command.words[0]} {script if isinstance(script, str) else script[0]}"
    reason = command.marker or MARKED.get(program)
    assert reason, (f"{command.source}: `{command.text}` is neither runnable here nor marked; add "
                    "<!-- docs-test: skip (why) --> above its code block or an entry to MARKED in this test")
    for word in command.words + list(command.env.values()):
        match = REPO_PATH.match(word)
        if match and not word.startswith("/"):
            assert (ROOT / match.group(1)).exists(), f"{command.source}: {match.group(1)} does not exist"
    if "STAGE_ARGS" in command.env:  # a launcher's flag file (and extra flags) must dry-run
        _pretrain([f"@{command.env['STAGE_ARGS']}", *shlex.split(command.env.get("EXTRA_ARGS", ""))], [])
    return f"marked: {reason}"


def test_docs_have_commands_to_check():
    sources = {command.source.split(":")[0] for command in ALL}
    assert {"README.md", "docs/data.md", "docs/export.md", "docs/training.md"} <= sources
    assert len(ALL) >= 25


def test_every_documented_command_runs_validates_or_says_why_not(monkeypatch):
    monkeypatch.chdir(ROOT)  # commands are written for the repository root
    outcomes, failures = {}, []
    for command in ALL:
        try:
            outcomes[f"{command.source} {command.text}"] = _check(command)
        except (AssertionError, SystemExit, ValueError) as error:
            failures.append(f"{command.source}: `{command.text}`: {type(error).__name__}: {error}")
    assert not failures, "\n".join(failures)
    assert sum(how == "ran" for how in outcomes.values()) >= 4  # --help and the dry runs really ran


def test_a_cli_start_is_quiet_about_missing_optional_backends():
    """megatron-core's four 'Transformer Engine and Apex are not installed' warnings per process are gone (a tool
    importing megatron-core's optimizers, without a filter of its own); the training entry point names the backends
    once, at INFO."""
    from megatron_puffin.optional_deps import describe_backends

    env = dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="")
    env.pop("PYTHONWARNINGS", None)
    tool = subprocess.run([sys.executable, "tools/make_synthetic_dataset.py", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert tool.returncode == 0 and "not installed" not in tool.stderr, tool.stderr[-2000:]
    dry = subprocess.run([sys.executable, "pretrain_puffin.py", "--dry-run", "@examples/stages/stage2_sft.args",
                          "--world-size", "64"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "not installed" not in dry.stderr and dry.stderr.count("backends: ") == 1, dry.stderr[-2000:]
    assert f"INFO pretrain_puffin: {describe_backends()}" in dry.stderr
