"""A stop signal while a command-line tool (or the trainer) is still loading its libraries (torch and megatron-core:
seconds), through the real programs: one line and 128 + the signal (megatron_puffin/process_lifetime.py,
``exit_quietly_while_starting``), where Ctrl-C was a ``KeyboardInterrupt`` traceback from inside an import and SIGTERM
a silent end. The signal is sent once torch's library is mapped into the process, so it lands inside the imports."""
import os
import signal
import subprocess
import sys
import time

from helpers.puffin import ROOT

PROGRAMS = ("tools/preprocess_data.py", "tools/make_synthetic_dataset.py", "tools/convert_checkpoint.py",
            "tools/evaluate_camera.py", "tools/generate.py", "tools/understand.py", "pretrain_puffin.py",
            "-m megatron_puffin.launch")


def _start_and_signal_while_importing(program: str, signum: int) -> subprocess.CompletedProcess:
    command = program.split() if program.startswith("-m ") else [str(ROOT / program)]
    proc = subprocess.Popen([sys.executable, *command, "--help"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES=""))
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            with open(f"/proc/{proc.pid}/maps") as maps:
                if "libtorch_cpu" in maps.read():
                    break
            time.sleep(0.005)
        os.killpg(proc.pid, signum)  # a terminal's Ctrl-C or a scheduler's stop reaches the whole process group
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_stop_signal_while_a_tool_or_the_trainer_loads_its_libraries_is_one_line_and_its_exit_status():
    for index, program in enumerate(PROGRAMS):
        signum = signal.SIGTERM if index % 3 == 2 else signal.SIGINT
        proc = _start_and_signal_while_importing(program, signum)
        tool = program.removeprefix("-m ") if program.startswith("-m ") else os.path.basename(program)
        what = "interrupted (Ctrl-C)" if signum == signal.SIGINT else "stopped by SIGTERM"
        assert proc.returncode == 128 + signum, (tool, proc.returncode, proc.stdout[-500:], proc.stderr[-3000:])
        assert proc.stderr == f"{tool}: {what} while starting; nothing was written\n", (tool, proc.stderr[-3000:])
        assert proc.stdout == "", (tool, proc.stdout[-500:])
