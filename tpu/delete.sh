#!/usr/bin/env bash
# Delete the Cloud TPU capacity tpu/create.sh made: the TPU VM NAME, or the queued resource NAME-qr
# together with its nodes (multislice, or a single slice created with --queued).
#
# Deletion does not ask for confirmation (gcloud runs with --quiet), so that the script works
# unattended, e.g. at the end of a job; --dry-run shows exactly what would be deleted. Checkpoints and
# outputs in a gs:// workdir are not touched.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: tpu/delete.sh [--name=NAME] [--zone=ZONE] [--num-slices=N] [--queued] [--project=PROJECT]
                     [--dry-run] [-h]

Deletes, without asking (gcloud --quiet; preview with --dry-run):
  one TPU VM:           gcloud compute tpus tpu-vm delete NAME --zone=ZONE --quiet
  a queued resource     gcloud compute tpus queued-resources delete NAME-qr --zone=ZONE --force --quiet
  (--num-slices=N > 1, or --queued): --force deletes its nodes NAME-0 ... NAME-(N-1) (or NAME) too.
Use the NAME/ZONE/NUM_SLICES (and --queued) given to tpu/create.sh. Every option is accepted as
--flag=value or --flag value. Data in gs:// workdirs and buckets is kept.

Environment (flags win):
  TPU_NAME, ZONE, NUM_SLICES, PROJECT   as for tpu/create.sh
  QUEUED       1 when a single slice was created with --queued             (default: 0)

Examples:
  tpu/delete.sh --name=kd-v5p --zone=us-east5-a --dry-run
  tpu/delete.sh --name=kd --zone=us-east5-a --num-slices=2
EOF
}

TPU_NAME="${TPU_NAME:-kdjax}"
ZONE="${ZONE:-}"
NUM_SLICES="${NUM_SLICES:-1}"
QUEUED="${QUEUED:-0}"
PROJECT="${PROJECT:-}"
DRY_RUN=0

die() { echo "tpu/delete.sh: error: $*" >&2; exit 2; }

# quote(), run(), opt_value(), shared_option(), check_targets(), set_targets().
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

while [[ $# -gt 0 ]]; do
  shared_option "$@"
  if [[ "$OPT_SHIFT" -gt 0 ]]; then shift "$OPT_SHIFT"; continue; fi
  case "$1" in
    --queued) QUEUED=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) unknown_option "$1" ;;
  esac
done

check_targets
set_targets
if [[ "$NUM_SLICES" != 1 ]]; then QUEUED=1; fi

if [[ "$QUEUED" == 0 ]]; then
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${common[@]}" --quiet
else
  # --force deletes the nodes the queued resource holds; without it gcloud refuses while any exist.
  run gcloud compute tpus queued-resources delete "$TPU_NAME-qr" "${common[@]}" --force --quiet
fi
if [[ "$DRY_RUN" == 0 ]]; then echo "# deleted; the gs:// workdir keeps the checkpoints for a later rerun" >&2; fi
