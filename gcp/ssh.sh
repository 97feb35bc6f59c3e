#!/usr/bin/env bash
# Opens a shell on one worker of the TPU, or runs a command on one, several or all.
set -euo pipefail
USAGE="usage: gcp/ssh.sh [--env FILE] [--dry-run] [--worker N] [-- CMD ...]

Without CMD: an interactive shell on worker N (default 0).
With CMD: runs it (the words joined by spaces, as ssh does) on worker N, on a list
such as 0,2 or 1-3, or on all workers with --worker all."
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_common_args "$@"
worker=0
i=0
while ((i < ${#OPTS[@]})); do
  case "${OPTS[i]}" in
    --worker)
      ((i + 1 < ${#OPTS[@]})) || die "--worker needs a value"
      worker=${OPTS[i + 1]}
      i=$((i + 2))
      ;;
    --worker=*)
      worker=${OPTS[i]#--worker=}
      i=$((i + 1))
      ;;
    *) die "unknown option '${OPTS[i]}'; a command goes after -- (see --help)" ;;
  esac
done
load_env
require PROJECT ZONE TPU_NAME

if $HAS_PASSTHRU && ((${#PASSTHRU[@]} > 0)); then
  check_worker "$worker" true
  command_line="${PASSTHRU[*]}"
  gcloud_ssh "$worker" "$command_line"
else
  check_worker "$worker" false
  run_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--project=$PROJECT" "--zone=$ZONE" \
    "--worker=$worker"
fi
