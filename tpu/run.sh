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
Usage: tpu/run.sh [--name=NAME] [--zone=ZONE] [--num-slices=N] [--project=PROJECT] [--remote-dir=DIR]
                  [--config=FILE[:ARGS]] [--workdir=DIR] [--tfds-data-dir=DIR] [--local] [--dry-run] [-h]
                  [KDJAX_ARGS...] [-- KDJAX_ARGS...]

Runs on all workers of every slice at once (multi-host programs wait until every host has joined):
  gcloud compute tpus tpu-vm ssh NAME --worker=all --command \
    "cd ~/DIR && export KDJAX_DISTRIBUTED=1 ... && .venv/bin/python -m kdjax.main --config=FILE --workdir=WORKDIR KDJAX_ARGS..."
Arguments it does not know (e.g. --config.train.steps=50, --max_steps=100) go to kdjax.main, as does
everything after "--". Every option is accepted as --flag=value or --flag value.

  --config         a configs/<recipe>.py file, optionally with ':args'   (default: configs/quickstart.py)
  --workdir        checkpoints, logs, student/ and summary.json; use gs://BUCKET/PATH on multi-host
                   slices so every host writes one shared checkpoint   (default: workdir/<recipe name>)
  --tfds-data-dir  where prepared tfds data sets live, e.g. gs://BUCKET/tensorflow_datasets; exported
                   as TFDS_DATA_DIR on every worker                     (default: $TFDS_DATA_DIR, if set)
  --local          run here instead (a single TPU VM, a GPU box, a laptop); no gcloud involved
  --dry-run        print the commands instead of running them

Environment (flags win): TPU_NAME, ZONE, NUM_SLICES, PROJECT, REMOTE_DIR as for tpu/setup.sh;
TFDS_DATA_DIR as --tfds-data-dir. KDJAX_DISTRIBUTED=0 skips jax.distributed.initialize() on the
workers (1 by default for remote runs, since TPU VMs do not export their host lists to ssh sessions).

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
TFDS_DATA_DIR="${TFDS_DATA_DIR:-}"
CONFIG="configs/quickstart.py"
WORKDIR=""
LOCAL=0
DRY_RUN=0
EXTRA=()

die() { echo "tpu/run.sh: error: $*" >&2; exit 2; }

# quote(), run(), opt_value(), shared_option(), check_targets(), set_targets(), ssh_all_slices().
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

while [[ $# -gt 0 ]]; do
  shared_option "$@"
  if [[ "$OPT_SHIFT" -gt 0 ]]; then shift "$OPT_SHIFT"; continue; fi
  case "$1" in
    --remote-dir|--remote-dir=*) opt_value "$@"; REMOTE_DIR="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --tfds-data-dir|--tfds-data-dir=*) opt_value "$@"; TFDS_DATA_DIR="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --config|--config=*) opt_value "$@"; CONFIG="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --workdir|--workdir=*) opt_value "$@"; WORKDIR="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --local) LOCAL=1; shift ;;
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
    local_env=""
    if [[ -n "$TFDS_DATA_DIR" ]]; then local_env="export $(quote "TFDS_DATA_DIR=$TFDS_DATA_DIR") && "; fi
    echo "+ cd $(quote "$REPO") && $bootstrap && $local_env$kdjax_cmd"
    exit 0
  fi
  cd "$REPO"
  [[ -x .venv/bin/python ]] || bash tpu/setup.sh --local
  if [[ -n "$TFDS_DATA_DIR" ]]; then export TFDS_DATA_DIR; fi
  exec bash -c "$kdjax_cmd"
fi

check_targets
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9._-]+$ ]] || die "REMOTE_DIR must be a plain directory name under ~, got '$REMOTE_DIR'"
if [[ "$WORKDIR" != gs://* ]]; then
  echo "tpu/run.sh: note: workdir '$WORKDIR' is local to each worker; on multi-host slices use gs://BUCKET/PATH" \
       "so that checkpoints are shared and a rerun resumes" >&2
fi

set_targets

# Multislice needs no extra variables here: on queued-resource slices the TPU runtime publishes
# MEGASCALE_* in the VM metadata, where jax.distributed.initialize() reads them.
# TFDS_DATA_DIR travels explicitly: ssh sessions on the workers do not inherit this shell's environment.
exports=("KDJAX_DISTRIBUTED=${KDJAX_DISTRIBUTED:-1}" PYTHONUNBUFFERED=1)
if [[ -n "$TFDS_DATA_DIR" ]]; then exports+=("TFDS_DATA_DIR=$TFDS_DATA_DIR"); fi
remote="cd ~/$REMOTE_DIR && $bootstrap && export $(quote "${exports[@]}") && $kdjax_cmd"

ssh_all_slices "$remote" "kdjax.main failed on at least one slice; see the output above (a rerun resumes from the last checkpoint)"
