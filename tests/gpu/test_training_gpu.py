"""pretrain_puffin.py on one GPU in bf16 (NCCL, CUDA generators, the mixed-precision optimizer): it trains, saves,
and a run resumed from its middle checkpoint repeats the uninterrupted run's losses. Skipped without CUDA.
(First run on an H100: found and fixed CPU-initialised parameters left on the host, a CUDA generator used for a CPU
draw, a count tensor on the wrong device, and fp32 norm weights confusing the bf16 optimizer's checkpoint map.
Passed on an H200 on 2026-12-04 with the right-padded LLM and text-first MMDiT layouts, torch 2.11 + CUDA 13.0.)"""
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers.puffin import ROOT, make_tiny_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TINY = ROOT / "examples" / "tiny"


def _run(cwd, *flags):
    command = [sys.executable, str(ROOT / "pretrain_puffin.py"), f"@{TINY / 'model.args'}",
               f"@{TINY / 'stage2_sft.args'}", "--pretrained-checkpoint", "", "--tensorboard-dir", "", "--bf16",
               "--train-iters", "4", "--log-interval", "1", "--num-workers", "0", "--keep-last-n", "5", *flags]
    proc = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, proc.stderr[-4000:]


def _losses(path):
    return {r["iteration"]: {k: v for k, v in r.items() if k.startswith("loss/")}
            for r in map(json.loads, path.read_text().splitlines())}


def test_bf16_training_on_gpu_saves_and_resumes(tmp_path):
    make_tiny_dataset(tmp_path / "tiny", num_samples=16, num_heldout=4)  # stage2_sft.args validates on it
    _run(tmp_path, "--save", "run", "--save-interval", "2", "--metrics-file", "full.jsonl")
    _run(tmp_path, "--load", "run/iter_0000002", "--metrics-file", "resumed.jsonl")
    full, resumed = _losses(tmp_path / "full.jsonl"), _losses(tmp_path / "resumed.jsonl")
    assert sorted(resumed) == [3, 4]
    for iteration, losses in resumed.items():
        for task, loss in losses.items():
            assert loss == pytest.approx(full[iteration][task], rel=1e-3), (iteration, task)
