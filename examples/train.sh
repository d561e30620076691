#!/usr/bin/env bash
# Train one stage on this machine: torchrun with one process per GPU, the log tee'd to a file.
#
#   STAGE_ARGS=examples/tiny/stage1_alignment.args bash examples/train.sh
#   STAGE_ARGS=my_stage2.args SAVE_DIR=runs/s2 EXTRA_ARGS="--lr 1e-5" NPROC_PER_NODE=8 bash examples/train.sh
#
# Environment:
#   STAGE_ARGS      (required) flag file of the stage, passed as @STAGE_ARGS (argparse's @file)
#   SAVE_DIR        run directory: adds --save SAVE_DIR --load SAVE_DIR (rerunning the command resumes from its
#                   newest checkpoint) and prints SAVE_DIR/run_status.json at the end
#   EXTRA_ARGS      more flags, after the file's (so they override it); split on whitespace
#   NPROC_PER_NODE  processes (default: the number of visible GPUs, or 1 without GPUs)
#   MASTER_PORT     fixed rendezvous port (default: torchrun --standalone picks a free one)
#   LOG_DIR         directory of train-<date>.log (default: logs)
#   LAUNCHER        the torchrun-compatible launcher (default: python -m megatron_puffin.launch, torchrun's own
#                   launcher with the ranks' exit status; LAUNCHER=torchrun works too, with torchrun's endings)
#
# Exit status: the launcher's. 0 when every rank of pretrain_puffin.py finished with 0; otherwise the first failed
# rank's: 75 "stopped early after saving" (SIGTERM / SIGUSR1 sent to the ranks, --exit-duration-in-mins): rerun
# with --load <the --save directory>; 2 a flag mistake; 128 + N for a rank killed by signal N. When the launcher
# itself is stopped (a signal to this script or Ctrl-C), 128 + that signal, after the ranks have saved (plain
# torchrun: 1 in every such case). With SAVE_DIR, the status rank 0 wrote to SAVE_DIR/run_status.json
# ("finished", "interrupted": rerun to resume, "stopped": --exit-interval) is printed at the end. SIGTERM and
# SIGUSR1 sent to this script are forwarded to the launcher, which forwards them to the ranks; the terminal's
# SIGINT (Ctrl-C), SIGQUIT and SIGHUP go to this script's process group, which holds the launcher but not the
# ranks (torchrun starts each in a session of its own): the launcher forwards them. Ctrl-C and SIGHUP stop like
# SIGTERM (save, then exit); a second Ctrl-C makes the launcher send SIGTERM, which the saving ranks ignore.
set -euo pipefail
# Signals torchrun forwards to the ranks (its --signals-to-handle, read from PET_*; torch < 2.9 ignores it and
# forwards only SIGTERM, SIGINT, SIGHUP and SIGQUIT).
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
# torchrun waits this long for the ranks to save after forwarding a signal, then kills them (its default, 30 s, is
# shorter than a large checkpoint write). Data-loader workers ignore the signal; the ranks stop them after saving.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat >&2 <<EOF
usage: STAGE_ARGS=<flag file> [SAVE_DIR=<run dir>] [EXTRA_ARGS="<flags>"] \\
       [NPROC_PER_NODE=<n>] [MASTER_PORT=<port>] [LOG_DIR=<dir>] bash examples/train.sh
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
if [ -n "${LAUNCHER:-}" ]; then
  read -r -a launcher <<< "$LAUNCHER"
  [ "${#launcher[@]}" -gt 0 ] || usage "LAUNCHER='$LAUNCHER' names no program; unset it or give e.g. LAUNCHER=torchrun"
  command -v "${launcher[0]}" > /dev/null 2>&1 || usage "LAUNCHER=$LAUNCHER: ${launcher[0]} not found on PATH"
else
  launcher=(python -m megatron_puffin.launch)
  python -c "import megatron_puffin.launch" > /dev/null 2>&1 ||
    usage "python cannot import megatron_puffin; activate the environment first (source .venv/bin/activate)"
fi

gpus="$(gpu_count)"
NPROC_PER_NODE="${NPROC_PER_NODE:-$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 1)}"
LOG_DIR="${LOG_DIR:-logs}"
read -r -a extra_args <<< "${EXTRA_ARGS:-}"
if [ -n "${MASTER_PORT:-}" ]; then
  rendezvous=(--nnodes 1 --master-addr 127.0.0.1 --master-port "$MASTER_PORT")
else
  rendezvous=(--standalone)
fi

mkdir -p "$LOG_DIR" 2> /dev/null || usage "LOG_DIR=$LOG_DIR cannot be made a directory (a file, or a parent that is one?)"
log="$LOG_DIR/train-$(date +%Y%m%d-%H%M%S).log"
{ : >> "$log"; } 2> /dev/null || usage "cannot write the log $log; set LOG_DIR to a writable directory"

flags=("@$STAGE_ARGS")
if [ -n "${SAVE_DIR:-}" ]; then
  flags+=(--save "$SAVE_DIR" --load "$SAVE_DIR")
  if [ -e "$SAVE_DIR/run_status.json" ]; then  # an earlier run's: keep it apart from this run's
    mv -f "$SAVE_DIR/run_status.json" "$SAVE_DIR/run_status.prev.json"
  fi
fi
flags+=(${extra_args[@]+"${extra_args[@]}"})

echo "[train.sh] $NPROC_PER_NODE process(es), flags ${flags[*]}; log: $log" >&2
exec > >(trap '' INT QUIT HUP; exec tee -a "$log") 2>&1  # the log outlives Ctrl-C: the ranks log their save
pid=""
pending=""
forward() {  # SIGTERM / SIGUSR1 to this script: pass it on to the launcher (once it has started)
  if [ -n "$pid" ]; then kill -"$1" "$pid" 2> /dev/null || true; else pending="$1"; fi
}
trap 'forward TERM' TERM
trap 'forward USR1' USR1
trap : INT QUIT HUP  # the terminal sends them to the launcher too (same process group): forwarding would double them
"${launcher[@]}" "${rendezvous[@]}" --nproc-per-node "$NPROC_PER_NODE" \
  "$ROOT/pretrain_puffin.py" "${flags[@]}" &
pid=$!
[ -z "$pending" ] || forward "$pending"

# `wait` returns early (status > 128) when a trapped signal arrives: wait until the launcher has exited, then collect
# its own status if the last wait was the interrupted one (127: already collected).
status=0
wait "$pid" || status=$?
while kill -0 "$pid" 2> /dev/null; do
  status=0
  wait "$pid" || status=$?
done
last=0
wait "$pid" 2> /dev/null || last=$?
[ "$last" -eq 127 ] || status=$last

if [ -n "${SAVE_DIR:-}" ]; then
  if [ -f "$SAVE_DIR/run_status.json" ]; then
    echo "[train.sh] run status ($SAVE_DIR/run_status.json):" \
      "$(tr -d '\n' < "$SAVE_DIR/run_status.json" | tr -s ' ')"
  else
    echo "[train.sh] no $SAVE_DIR/run_status.json: the run ended before writing its status (see the log)"
  fi
fi
exit "$status"
