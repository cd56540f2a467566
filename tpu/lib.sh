# shellcheck shell=bash
# Shared by tpu/*.sh (sourced, not run). The caller defines `die MESSAGE` (prints its own
# "tpu/<script>: error:" prefix and exits 2) and sets DRY_RUN before calling run().

# Shell-quote the arguments so that a printed line can be pasted into a shell (and so that a command
# string survives the remote shell of `gcloud ... ssh --command`). `--flag=value` keeps the flag bare.
quote() {
  local arg sq="'" esc="'\\''" out=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[-A-Za-z0-9_@%+=:,./~]+$ ]]; then
      out+=("$arg")
    elif [[ "$arg" =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
      out+=("${BASH_REMATCH[1]}'${BASH_REMATCH[2]//$sq/$esc}'")
    else
      out+=("'${arg//$sq/$esc}'")
    fi
  done
  echo "${out[*]}"
}

# Print (dry run: "+ " and the quoted command) or execute one command.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(quote "$@")"
  else
    "$@"
  fi
}

# The value of the option in $1, given as `--flag=value` or as `--flag value` (then $2); sets
# OPT_VALUE and OPT_SHIFT (how many arguments to shift). One helper for every script, so that both
# spellings work for every option:  --zone|--zone=*) opt_value "$@"; ZONE="$OPT_VALUE"; shift "$OPT_SHIFT" ;;
# An empty value, or a missing one (end of arguments, or the next argument is another option), is
# an error rather than a silent default.
OPT_VALUE=""
OPT_SHIFT=1
# shellcheck disable=SC2034  # OPT_SHIFT is read by the sourcing script
opt_value() {
  local flag="${1%%=*}"
  if [[ "$1" == *=* ]]; then
    OPT_VALUE="${1#*=}"
    OPT_SHIFT=1
  elif [[ $# -ge 2 && "$2" != -* ]]; then
    OPT_VALUE="$2"
    OPT_SHIFT=2
  else
    die "$flag needs a value, e.g. $flag=VALUE (see -h)"
  fi
  [[ -n "$OPT_VALUE" ]] || die "$flag needs a non-empty value, e.g. $flag=VALUE (see -h)"
}

# The options every script shares: --name, --zone, --num-slices, --project (each as --flag=value or
# --flag value) and --dry-run. Sets TPU_NAME, ZONE, NUM_SLICES, PROJECT or DRY_RUN, and OPT_SHIFT to
# the number of arguments used, 0 when $1 is none of them (the script's own case handles it then).
# shellcheck disable=SC2034  # the variables are read by the sourcing script
shared_option() {
  case "$1" in
    --name|--name=*) opt_value "$@"; TPU_NAME="$OPT_VALUE" ;;
    --zone|--zone=*) opt_value "$@"; ZONE="$OPT_VALUE" ;;
    --num-slices|--num-slices=*) opt_value "$@"; NUM_SLICES="$OPT_VALUE" ;;
    --project|--project=*) opt_value "$@"; PROJECT="$OPT_VALUE" ;;
    --dry-run) DRY_RUN=1; OPT_SHIFT=1 ;;
    *) OPT_SHIFT=0 ;;
  esac
}

# One-line error for an argument no case matched.
unknown_option() {
  die "unknown option '$1'; run tpu/$(basename "$0") -h for the options"
}

# The TPU VM nodes a command addresses and the gcloud flags that locate them, from TPU_NAME,
# NUM_SLICES, ZONE and PROJECT: one node NAME, or NAME-0 ... NAME-(N-1) for a queued resource of N
# slices (create.sh names them so via --node-prefix). Sets `nodes` and `common`.
nodes=()
common=()
set_targets() {
  local i
  nodes=()
  if [[ "$NUM_SLICES" == 1 ]]; then
    nodes=("$TPU_NAME")
  else
    for ((i = 0; i < NUM_SLICES; i++)); do nodes+=("$TPU_NAME-$i"); done
  fi
  common=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then common+=(--project="$PROJECT"); fi
}

# Checks shared by the scripts that address existing TPUs (one-line errors naming the fix).
check_targets() {
  [[ -n "$ZONE" ]] || die "ZONE is not set: export ZONE=<zone of the TPU> or pass --zone=us-east5-a"
  [[ "$NUM_SLICES" =~ ^[1-9][0-9]*$ ]] || die "NUM_SLICES must be a positive integer, got '$NUM_SLICES'"
  [[ "$TPU_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
    || die "TPU_NAME '$TPU_NAME' is not a valid resource name: use lowercase letters, digits and '-'"
}

# Run one command on every worker of every slice in `nodes` (all slices at once, since multi-host JAX
# programs block until every host joins); die with $2 if any slice fails. Call set_targets first.
ssh_all_slices() {
  local command="$1" failure="$2" node pid failed=0 pids=()
  for node in "${nodes[@]}"; do
    if [[ "$DRY_RUN" == 1 ]]; then
      run gcloud compute tpus tpu-vm ssh "$node" --worker=all "${common[@]}" --command="$command"
    else
      gcloud compute tpus tpu-vm ssh "$node" --worker=all "${common[@]}" --command="$command" &
      pids+=($!)
    fi
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  [[ "$failed" == 0 ]] || die "$failure"
}
