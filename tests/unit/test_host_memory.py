"""Host memory reuse on CPU (training.host_memory): with glibc's defaults every large buffer freed and allocated
again is mapped again and faulted in page by page; after ``retain_freed_memory`` the process reuses it. Measured in
a fresh process (the setting is process-wide) by its minor page faults."""
import json
import subprocess
import sys

import pytest

from megatron_puffin.training import host_memory

SCRIPT = r"""
import json, resource, torch
from megatron_puffin.training.host_memory import retain_freed_memory

MIBS = (3, 48, 16, 70, 5, 33, 100)  # a forward's buffers of several sizes, touched, then all freed


def step():
    buffers = [torch.empty(mib << 18).fill_(1.0) for mib in MIBS]
    del buffers


def faults_of_reallocating(times=6):
    step()  # once first: the heap grows to hold them
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        step()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_reallocating()
accepted = retain_freed_memory()
print(json.dumps({"default": default, "accepted": accepted, "retained": faults_of_reallocating()}))
"""


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc only (the setting does nothing elsewhere)")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    pages = 6 * (275 << 20) // 4096  # every page of the six steps' buffers
    assert result["accepted"]
    assert result["default"] > pages // 2, result  # glibc's defaults: mapped and faulted in again each step
    # Kept for reuse: measured 5 % of the pages faulted in again (gaps between blocks aligned by torch's
    # posix_memalign), against 100 % with the defaults.
    assert result["retained"] < pages // 5, result


def test_other_c_libraries_keep_their_defaults(monkeypatch):
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    assert host_memory.retain_freed_memory() is False


def test_the_setting_applies_to_cpu_runs_only(monkeypatch, caplog):
    """Training's and tools/cache_latents.py's one rule: on a CPU the setting is applied when asked for; on a GPU a
    request only warns (it would change nothing there), and nothing is applied."""
    calls = []
    monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: calls.append("applied") or True)
    assert host_memory.cache_for_device(False, "cpu") is False and calls == []
    assert host_memory.cache_for_device(True, "cuda") is False and calls == []
    assert "--host-malloc-cache has no effect on a cuda run" in caplog.text
    assert host_memory.cache_for_device(True, "cpu") is True and calls == ["applied"]
