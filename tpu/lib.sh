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
