#!/usr/bin/env bash
# Create the Cloud TPU capacity a kdjax run needs: one TPU VM slice, or a queued resource holding
# NUM_SLICES identical slices for multislice training (data parallelism over the data-center network).
#
# Every setting comes from an environment variable and can be overridden by a flag; --dry-run prints
# the gcloud commands instead of running them, so the script doubles as documentation.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: tpu/create.sh [--name NAME] [--zone ZONE] [--type ACCELERATOR_TYPE] [--version RUNTIME_VERSION]
                     [--num-slices N] [--project PROJECT] [--spot] [--dry-run] [-h]

Creates a Cloud TPU VM (`gcloud compute tpus tpu-vm create`) or, with --num-slices > 1, a queued
resource of N slices (`gcloud compute tpus queued-resources create --node-count N`) whose nodes are
named NAME-0 ... NAME-(N-1). tpu/setup.sh and tpu/run.sh take the same NAME/ZONE/NUM_SLICES.

Environment (flags win):
  TPU_NAME          name of the VM, or node prefix for multislice          (default: kdjax)
  ZONE              zone with quota for the accelerator, e.g. us-east5-a   (required)
  ACCELERATOR_TYPE  slice shape: v4-8, v5litepod-8, v5p-32, v6e-16, ...    (default: v5p-8)
  RUNTIME_VERSION   TPU software image; derived from the accelerator family when unset
                    (v4: tpu-ubuntu2204-base, v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5,
                     v6e: v2-alpha-tpuv6e)
  NUM_SLICES        1 for a single slice, >1 for multislice via queued resources (default: 1)
  PROJECT           Google Cloud project (default: gcloud's configured project)
  SPOT              1 to request spot capacity (default: 0)

Examples:
  ZONE=us-east5-a ACCELERATOR_TYPE=v5p-32 tpu/create.sh --dry-run
  tpu/create.sh --zone us-east5-a --type v5p-32 --num-slices 2 --spot
EOF
}

TPU_NAME="${TPU_NAME:-kdjax}"
ZONE="${ZONE:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
NUM_SLICES="${NUM_SLICES:-1}"
PROJECT="${PROJECT:-}"
SPOT="${SPOT:-0}"
DRY_RUN=0

die() { echo "tpu/create.sh: error: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see -h)"; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) need_value "$@"; TPU_NAME="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --type|--accelerator-type) need_value "$@"; ACCELERATOR_TYPE="$2"; shift 2 ;;
    --version|--runtime-version) need_value "$@"; RUNTIME_VERSION="$2"; shift 2 ;;
    --num-slices) need_value "$@"; NUM_SLICES="$2"; shift 2 ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see -h)" ;;
  esac
done

[[ -n "$ZONE" ]] || die "ZONE is not set: export ZONE=<zone with TPU quota> or pass --zone us-east5-a"
[[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES must be a positive integer, got '$NUM_SLICES'"
[[ "$TPU_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "TPU_NAME '$TPU_NAME' is not a valid resource name: use lowercase letters, digits and '-'"

if [[ -z "$RUNTIME_VERSION" ]]; then
  case "$ACCELERATOR_TYPE" in
    v4-*) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) RUNTIME_VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) RUNTIME_VERSION="v2-alpha-tpuv5" ;;
    v6e-*) RUNTIME_VERSION="v2-alpha-tpuv6e" ;;
    *) die "no default runtime for ACCELERATOR_TYPE '$ACCELERATOR_TYPE': set RUNTIME_VERSION or pass --version" ;;
  esac
fi

# quote() and run(): print (dry run) or execute one command.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

common=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && common+=(--project="$PROJECT")

if [[ "$NUM_SLICES" == 1 ]]; then
  args=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${common[@]}"
        --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  [[ "$SPOT" == 1 ]] && args+=(--spot)
  run "${args[@]}"
  echo "# next: TPU_NAME=$TPU_NAME ZONE=$ZONE tpu/setup.sh" >&2
else
  # A queued resource grants all slices at once (or none), which multislice jobs need; nodes are
  # named <node-prefix>-<slice index>.
  args=(gcloud compute tpus queued-resources create "$TPU_NAME-qr" "${common[@]}"
        --node-prefix="$TPU_NAME" --node-count="$NUM_SLICES"
        --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
  [[ "$SPOT" == 1 ]] && args+=(--spot)
  run "${args[@]}"
  # Wait until the request is granted: creation returns as soon as the request is queued.
  run gcloud compute tpus queued-resources describe "$TPU_NAME-qr" "${common[@]}" --format='value(state.state)'
  echo "# the slices exist once the state above reads ACTIVE (rerun the describe command to poll);" >&2
  echo "# next: TPU_NAME=$TPU_NAME ZONE=$ZONE NUM_SLICES=$NUM_SLICES tpu/setup.sh" >&2
fi
