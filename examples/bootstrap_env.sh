# Sourced by tests/run.sh and examples/quickstart.sh: create or reuse the project's virtual environment and
# install what the project needs. Set PUFFIN_VENV to use another location.
set -euo pipefail
_PUFFIN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PUFFIN_VENV:-$_PUFFIN_ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[bootstrap] creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
source "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[bootstrap] no importable torch: installing torch==2.13.0"
  python -m pip install -q "torch==2.13.0"
fi
_stamp="$VENV/.puffin_install_stamp"
_hash="$(cat "$_PUFFIN_ROOT/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$_stamp" ] || [ "$(cat "$_stamp")" != "$_hash" ] || ! python -c "import megatron_puffin" >/dev/null 2>&1; then
  echo "[bootstrap] installing megatron_puffin[test] (editable)"
  python -m pip install -q -e "$_PUFFIN_ROOT[test]" 2>&1 | grep -v "^WARNING: Location" || true
  python -c "import megatron_puffin, megatron.core" || { echo "[bootstrap] install failed" >&2; exit 1; }
  echo "$_hash" > "$_stamp"
fi
export PYTHONHASHSEED=0
