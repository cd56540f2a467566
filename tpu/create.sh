#!/usr/bin/env bash
# Create the Cloud TPU capacity a kdjax run needs: one TPU VM slice, or a queued resource holding
# NUM_SLICES identical slices for multislice training (data parallelism over the data-center network).
#
# Every setting comes from an environment variable and can be overridden by a flag; --dry-run prints
# the gcloud commands instead of running them, so the script doubles as documentation.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: tpu/create.sh [--name=NAME] [--zone=ZONE] [--type=ACCELERATOR_TYPE] [--version=RUNTIME_VERSION]
                     [--num-slices=N] [--queued] [--project=PROJECT] [--spot | --preemptible]
                     [--dry-run] [-h]

Creates a Cloud TPU VM (`gcloud compute tpus tpu-vm create NAME`) or a queued resource NAME-qr
(`gcloud compute tpus queued-resources create`): with --num-slices=N > 1 it holds N slices named
NAME-0 ... NAME-(N-1); with --queued and one slice, a single node named NAME (the request waits in
the queue until capacity frees up instead of failing). tpu/setup.sh, tpu/run.sh and tpu/delete.sh
take the same NAME/ZONE/NUM_SLICES (and --queued, for delete.sh). Every option is accepted as
--flag=value or --flag value.

Environment (flags win):
  TPU_NAME          name of the VM, or node prefix for multislice          (default: kdjax)
  ZONE              zone with quota for the accelerator, e.g. us-east5-a   (required)
  ACCELERATOR_TYPE  any slice shape: v4-8, v4-32, v5litepod-8, v5p-32, v6e-16, ... (default: v5p-8)
  RUNTIME_VERSION   TPU software image; derived from the accelerator family when unset
                    (v2, v3, v4: tpu-ubuntu2204-base, v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5,
                     v6e: v2-alpha-tpuv6e); other families need --version
  NUM_SLICES        1 for a single slice, >1 for multislice via queued resources (default: 1)
  QUEUED            1 to request even one slice through a queued resource     (default: 0)
  PROJECT           Google Cloud project (default: gcloud's configured project)
  SPOT              1 to request spot capacity (cheaper; can be preempted)    (default: 0)
  PREEMPTIBLE       1 for a legacy preemptible TPU VM (not with queued resources) (default: 0)

Examples:
  ZONE=us-east5-a ACCELERATOR_TYPE=v5p-32 tpu/create.sh --dry-run
  tpu/create.sh --zone=us-east5-a --type=v5p-32 --num-slices=2 --spot
EOF
}

TPU_NAME="${TPU_NAME:-kdjax}"
ZONE="${ZONE:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
NUM_SLICES="${NUM_SLICES:-1}"
QUEUED="${QUEUED:-0}"
PROJECT="${PROJECT:-}"
SPOT="${SPOT:-0}"
PREEMPTIBLE="${PREEMPTIBLE:-0}"
DRY_RUN=0

die() { echo "tpu/create.sh: error: $*" >&2; exit 2; }

# quote(), run(), opt_value(), shared_option(), check_targets(), set_targets().
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

while [[ $# -gt 0 ]]; do
  shared_option "$@"
  if [[ "$OPT_SHIFT" -gt 0 ]]; then shift "$OPT_SHIFT"; continue; fi
  case "$1" in
    --type|--type=*|--accelerator-type|--accelerator-type=*)
      opt_value "$@"; ACCELERATOR_TYPE="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --version|--version=*|--runtime-version|--runtime-version=*)
      opt_value "$@"; RUNTIME_VERSION="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) unknown_option "$1" ;;
  esac
done

check_targets
[[ "$ACCELERATOR_TYPE" =~ ^[a-z0-9]+-[0-9]+$ ]] \
  || die "ACCELERATOR_TYPE '$ACCELERATOR_TYPE' is not a slice shape like v5p-32 or v5litepod-8: pass --type=FAMILY-CORES"
if [[ "$SPOT" == 1 && "$PREEMPTIBLE" == 1 ]]; then
  die "--spot and --preemptible exclude each other: pick one (--spot is the newer)"
fi
if [[ "$NUM_SLICES" != 1 ]]; then QUEUED=1; fi
if [[ "$QUEUED" == 1 && "$PREEMPTIBLE" == 1 ]]; then
  die "--preemptible is for plain TPU VMs only: use --spot with queued resources (--queued or --num-slices > 1)"
fi

if [[ -z "$RUNTIME_VERSION" ]]; then
  # tpu-ubuntu2204-base is the generic image (Ubuntu 22.04 with the TPU driver, no framework) that
  # JAX uses on v2 to v4; v5e, v5p and v6e have their own images.
  case "$ACCELERATOR_TYPE" in
    v2-*|v3-*|v4-*) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) RUNTIME_VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) RUNTIME_VERSION="v2-alpha-tpuv5" ;;
    v6e-*) RUNTIME_VERSION="v2-alpha-tpuv6e" ;;
    *) die "no default runtime for ACCELERATOR_TYPE '$ACCELERATOR_TYPE': set RUNTIME_VERSION or pass --version=IMAGE" ;;
  esac
fi

set_targets

if [[ "$QUEUED" == 0 ]]; then
  args=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${common[@]}"
        --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  if [[ "$SPOT" == 1 ]]; then args+=(--spot); fi
  if [[ "$PREEMPTIBLE" == 1 ]]; then args+=(--preemptible); fi
  run "${args[@]}"
  echo "# next: tpu/setup.sh --name=$TPU_NAME --zone=$ZONE" >&2
else
  # A queued resource grants all slices at once (or none), which multislice jobs need; nodes are
  # named <node-prefix>-<slice index>. One slice keeps the plain name, so NUM_SLICES=1 finds it.
  args=(gcloud compute tpus queued-resources create "$TPU_NAME-qr" "${common[@]}")
  if [[ "$NUM_SLICES" == 1 ]]; then
    args+=(--node-id="$TPU_NAME")
  else
    args+=(--node-prefix="$TPU_NAME" --node-count="$NUM_SLICES")
  fi
  args+=(--accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
  if [[ "$SPOT" == 1 ]]; then args+=(--spot); fi
  run "${args[@]}"
  # Creation returns as soon as the request is queued; the nodes exist once it is ACTIVE.
  run gcloud compute tpus queued-resources describe "$TPU_NAME-qr" "${common[@]}" --format='value(state.state)'
  echo "# the slices exist once the state above reads ACTIVE (rerun the describe command to poll);" >&2
  echo "# next: tpu/setup.sh --name=$TPU_NAME --zone=$ZONE --num-slices=$NUM_SLICES" >&2
fi
