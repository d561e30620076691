#!/usr/bin/env bash
# One command to test megatron_puffin: creates or reuses a virtual environment, installs torch 2.13.0 only when
# no torch is importable (an installed torch, e.g. a CUDA build, is never replaced), installs the package with
# its test extra, and runs every test level that applies to this machine.
#   bash tests/run.sh              # all levels
#   bash tests/run.sh -k camera    # extra arguments go to pytest
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
source "$ROOT/examples/bootstrap_env.sh"

LEVELS=(tests/unit tests/parity tests/distributed tests/functional)
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  LEVELS+=(tests/gpu)
  echo "[tests/run.sh] CUDA is available: tests/gpu included"
else
  echo "[tests/run.sh] no CUDA device: tests/gpu skipped (run them on a GPU machine with the same command)"
fi
set +e
python -m pytest "${LEVELS[@]}" "$@"
rc=$?
set -e
# pytest exits 5 when nothing was collected: that is a failure of the suite, not a pass.
exit $rc
