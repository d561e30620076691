#!/usr/bin/env bash
# Train one stage on this machine: torchrun with one process per GPU, the log tee'd to a file.
#
#   STAGE_ARGS=examples/tiny/stage1_alignment.args bash examples/train.sh
#   STAGE_ARGS=my_stage2.args EXTRA_ARGS="--lr 1e-5 --save runs/s2" NPROC_PER_NODE=8 bash examples/train.sh
#
# Environment:
#   STAGE_ARGS      (required) flag file of the stage, passed as @STAGE_ARGS (argparse's @file)
#   EXTRA_ARGS      more flags, after the file's (so they override it); split on whitespace
#   NPROC_PER_NODE  processes (default: the number of visible GPUs, or 1 without GPUs)
#   MASTER_PORT     fixed rendezvous port (default: torchrun --standalone picks a free one)
#   LOG_DIR         directory of train-<date>.log (default: logs)
#
# Exit status: torchrun's. It is 0 when every rank of pretrain_puffin.py finished with 0; torchrun reports any
# other rank exit status as 1, including 75 ("stopped early after saving" on SIGTERM / SIGUSR1 /
# --exit-duration-in-mins; its summary then reads "exitcode : 75"): rerun with --load <the --save directory>.
# SIGTERM, SIGINT and SIGUSR1 sent to this script reach the ranks through torchrun.
set -euo pipefail
# Signals torchrun forwards to the ranks (its --signals-to-handle, read from PET_*; torch < 2.9 ignores it and
# forwards only SIGTERM, SIGINT, SIGHUP and SIGQUIT).
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat >&2 <<EOF
usage: STAGE_ARGS=<flag file> [EXTRA_ARGS="<flags>"] [NPROC_PER_NODE=<n>] [MASTER_PORT=<port>] [LOG_DIR=<dir>] \\
       bash examples/train.sh
error: $1
EOF
  exit 2
}

gpu_count() {
  if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then  # what torch will see
    awk -F, '{ print NF }' <<< "$CUDA_VISIBLE_DEVICES"
  elif command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}

[ -n "${STAGE_ARGS:-}" ] ||
  usage "STAGE_ARGS is not set; give the stage's flag file, e.g. STAGE_ARGS=examples/tiny/stage1_alignment.args"
[ -f "$STAGE_ARGS" ] || usage "STAGE_ARGS=$STAGE_ARGS is not a file"
command -v torchrun > /dev/null 2>&1 ||
  usage "torchrun not found on PATH; activate the environment first (source .venv/bin/activate)"

gpus="$(gpu_count)"
NPROC_PER_NODE="${NPROC_PER_NODE:-$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 1)}"
LOG_DIR="${LOG_DIR:-logs}"
read -r -a extra_args <<< "${EXTRA_ARGS:-}"
if [ -n "${MASTER_PORT:-}" ]; then
  rendezvous=(--nnodes 1 --master-addr 127.0.0.1 --master-port "$MASTER_PORT")
else
  rendezvous=(--standalone)
fi

mkdir -p "$LOG_DIR"
log="$LOG_DIR/train-$(date +%Y%m%d-%H%M%S).log"
echo "[train.sh] $NPROC_PER_NODE process(es), flags @$STAGE_ARGS ${extra_args[*]:-}; log: $log" >&2
exec > >(tee -a "$log") 2>&1
exec torchrun "${rendezvous[@]}" --nproc-per-node "$NPROC_PER_NODE" \
  "$ROOT/pretrain_puffin.py" "@$STAGE_ARGS" ${extra_args[@]+"${extra_args[@]}"}
