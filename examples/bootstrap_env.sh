# shellcheck shell=bash
# Sourced by tests/run.sh and examples/quickstart.sh (and by you: `source examples/bootstrap_env.sh`): create or
# reuse the project's virtual environment, activate it and install what the project needs.
#   1. PUFFIN_VENV (default <repo>/.venv): created with `python3 -m venv` when it has no bin/python.
#   2. torch==2.13.0 (CPU wheel from PyPI) only when no torch is importable: a torch installed first (a CUDA build
#      on a GPU cluster) is never replaced.
#   3. `pip install -e <repo>[test]` when setup.py changed since the last install (a stamp file in the venv).
#   4. PYTHONHASHSEED=0.
# It leaves the caller's shell options alone (no errexit / nounset / pipefail) and returns non-zero on failure
# instead of exiting, so sourcing it into an interactive shell never closes that shell.
_puffin_bootstrap() {
  local root venv stamp hash
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" || return 1
  venv="${PUFFIN_VENV:-$root/.venv}"
  if [ ! -x "$venv/bin/python" ]; then
    echo "[bootstrap] creating virtual environment $venv"
    python3 -m venv "$venv" || { echo "[bootstrap] could not create $venv" >&2; return 1; }
  fi
  # shellcheck disable=SC1091  # the environment is created above
  source "$venv/bin/activate" || return 1
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  if ! python -c "import torch" > /dev/null 2>&1; then
    echo "[bootstrap] no importable torch: installing torch==2.13.0"
    python -m pip install -q "torch==2.13.0" || { echo "[bootstrap] installing torch failed" >&2; return 1; }
  fi
  stamp="$venv/.puffin_install_stamp"
  hash="$(sha256sum < "$root/setup.py" | cut -d' ' -f1)"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$hash" ] || ! python -c "import megatron_puffin" > /dev/null 2>&1; then
    echo "[bootstrap] installing megatron_puffin[test] (editable)"
    python -m pip install -q -e "${root}[test]" 2>&1 | grep -v "^WARNING: Location" || true
    python -c "import megatron_puffin, megatron.core" || { echo "[bootstrap] install failed" >&2; return 1; }
    echo "$hash" > "$stamp"
  fi
  export PYTHONHASHSEED=0
}
_puffin_bootstrap
_puffin_status=$?
unset -f _puffin_bootstrap
if [ "$_puffin_status" -ne 0 ]; then
  unset _puffin_status
  # shellcheck disable=SC2317  # the exit runs when this file is run as a script, where return fails
  return 1 2> /dev/null || exit 1  # sourced: return to the caller; run as a script: exit
fi
unset _puffin_status
