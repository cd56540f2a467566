# Shared by tpu/*.sh (sourced, not run). Expects DRY_RUN to be set by the caller.

# Print (dry run) or execute one command; printed lines are quoted so they can be pasted into a shell.
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
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ $(quote "$@")"
  else
    "$@"
  fi
}

# Run one command on every worker of every slice in `nodes` (all slices at once, since multi-host JAX
# programs block until every host joins); die with $2 if any slice fails. Expects `nodes`, `common`
# (gcloud flags) and `die` from the caller.
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
