#!/usr/bin/env bash
# Run `python -m kdjax.main` on every worker of a TPU slice (every slice, for multislice) at once,
# or on this machine with --local. All hosts run the same command: jax.distributed wires them into
# one program (kdjax.main calls kdjax.sharding.maybe_initialize_distributed first thing).
#
# Idempotent like tpu/setup.sh: a worker without .venv installs first, then runs. Rerunning the same
# command on the same workdir resumes from the last checkpoint.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: tpu/run.sh [--name NAME] [--zone ZONE] [--num-slices N] [--project PROJECT] [--remote-dir DIR]
                  [--config FILE[:ARGS]] [--workdir DIR] [--local] [--dry-run] [-h] [-- KDJAX_ARGS...]

Runs on all workers:
  gcloud compute tpus tpu-vm ssh NAME --worker=all --command \
    "cd ~/DIR && .venv/bin/python -m kdjax.main --config=FILE --workdir=WORKDIR KDJAX_ARGS..."
Arguments it does not know (e.g. --config.train.steps=50, --max_steps=100) go to kdjax.main, as does
everything after "--".

  --config    a configs/<recipe>.py file, optionally with ':args'      (default: configs/quickstart.py)
  --workdir   checkpoints, logs, student/ and summary.json; use gs://BUCKET/PATH on multi-host slices
              so every host writes one shared checkpoint      (default: workdir/<recipe name>)
  --local     run here instead (a single TPU VM, a GPU box, a laptop); no gcloud involved
  --dry-run   print the commands instead of running them

Environment (flags win): TPU_NAME, ZONE, NUM_SLICES, PROJECT, REMOTE_DIR as for tpu/setup.sh.
KDJAX_DISTRIBUTED=0 skips jax.distributed on the workers (set to 1 for remote runs by default, since
TPU VMs do not export their host lists to ssh sessions).

Examples:
  tpu/run.sh --config=configs/quickstart.py:steps=600 --workdir=gs://my-bucket/kdjax/qs
  tpu/run.sh --local --config=configs/quickstart.py -- --config.train.learning_rate=3e-4
EOF
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TPU_NAME="${TPU_NAME:-kdjax}"
ZONE="${ZONE:-}"
NUM_SLICES="${NUM_SLICES:-1}"
PROJECT="${PROJECT:-}"
REMOTE_DIR="${REMOTE_DIR:-kdjax}"
CONFIG="configs/quickstart.py"
WORKDIR=""
LOCAL=0
DRY_RUN=0
EXTRA=()

die() { echo "tpu/run.sh: error: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see -h)"; }

# quote() and run(): print (dry run) or execute one command.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need_value "$@"; TPU_NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --num-slices) need_value "$@"; NUM_SLICES="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --remote-dir) need_value "$@"; REMOTE_DIR="$2"; shift 2 ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --config=*) CONFIG="${1#--config=}"; shift ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --workdir=*) WORKDIR="${1#--workdir=}"; shift ;;
    --local) LOCAL=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA+=("$@"); break ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done

[[ -n "$CONFIG" ]] || die "--config is empty: pass e.g. --config=configs/quickstart.py"
config_file="${CONFIG%%:*}"
[[ -f "$REPO/$config_file" ]] || die "config file '$config_file' not found under $REPO: pass a path relative to the repo root, e.g. configs/quickstart.py"
if [[ -z "$WORKDIR" ]]; then
  recipe="$(basename "$config_file" .py)"
  WORKDIR="workdir/$recipe"
fi

# The command each host runs, as one shell-quoted string (it travels through ssh --command).
kdjax_cmd="$(quote .venv/bin/python -m kdjax.main "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")"
bootstrap="{ [ -x .venv/bin/python ] || bash tpu/setup.sh --local; }"

if [[ "$LOCAL" == 1 ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ cd $(quote "$REPO") && $bootstrap && $kdjax_cmd"
    exit 0
  fi
  cd "$REPO"
  [[ -x .venv/bin/python ]] || bash tpu/setup.sh --local
  exec bash -c "$kdjax_cmd"
fi

[[ -n "$ZONE" ]] || die "ZONE is not set: export ZONE=<zone of the TPU> or pass --zone us-east5-a (or use --local)"
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES must be a positive integer, got '$NUM_SLICES'"
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9._-]+$ ]] || die "REMOTE_DIR must be a plain directory name under ~, got '$REMOTE_DIR'"
if [[ "$WORKDIR" != gs://* ]]; then
  echo "tpu/run.sh: note: workdir '$WORKDIR' is local to each worker; on multi-host slices use gs://BUCKET/PATH" \
       "so that checkpoints are shared and a rerun resumes" >&2
fi

nodes=()
if [[ "$NUM_SLICES" == 1 ]]; then
  nodes=("$TPU_NAME")
else
  for ((i = 0; i < NUM_SLICES; i++)); do nodes+=("$TPU_NAME-$i"); done
fi
common=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && common+=(--project="$PROJECT")

# Multislice needs no extra variables here: on queued-resource slices the TPU runtime publishes
# MEGASCALE_* in the VM metadata, where jax.distributed.initialize() reads them.
remote="cd ~/$REMOTE_DIR && $bootstrap && export KDJAX_DISTRIBUTED=${KDJAX_DISTRIBUTED:-1} PYTHONUNBUFFERED=1 && $kdjax_cmd"

ssh_all_slices "$remote" "kdjax.main failed on at least one slice; see the output above (a rerun resumes from the last checkpoint)"
