"""Suite-wide settings: deterministic, single-threaded-per-process torch, quiet optional-dependency warnings, and
megatron-core's patches applied once for the pytest process (spawned ranks apply them in tests/helpers/multiprocess.py)."""
import logging
import os
import sys
import warnings

os.environ.setdefault("PYTHONHASHSEED", "0")
warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")

import torch  # noqa: E402

torch.use_deterministic_algorithms(True, warn_only=True)
logging.getLogger("megatron").setLevel(logging.WARNING)

from megatron_puffin.platform import setup  # noqa: E402

setup()


def pytest_runtest_teardown(item, nextitem):
    """The pooled ranks of tests/helpers/multiprocess.py serve one folder of tests, then end (memory)."""
    pools = sys.modules.get("helpers.multiprocess")
    if pools is not None and (nextitem is None or nextitem.path.parent != item.path.parent):
        pools.close_pools()


def pytest_unconfigure(config):
    """A test that fails while a data loader's workers run can leave them alive (its traceback keeps the loader).
    At the interpreter's exit multiprocessing sends its daemonic children SIGTERM and waits for them, but the
    workers ignore SIGTERM by design (megatron_puffin/process_lifetime.py): one failure would become a hung suite.
    They are killed here, after the report, and named. Other children (the checkpoint queue's manager) are shut
    down by their own finalizers."""
    import multiprocessing

    left = [child for child in multiprocessing.active_children() if child.daemon]
    for child in left:
        child.kill()
        child.join(10)
    if left:
        print(f"\nconftest: killed {len(left)} child process(es) still running at the end of the session: "
              f"{', '.join(f'{child.name} (pid {child.pid})' for child in left)}", file=sys.stderr)
