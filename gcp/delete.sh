#!/usr/bin/env bash
# Deletes the TPU VM (or, with QUEUED=true, the queued resource and its node).
set -euo pipefail
USAGE="usage: gcp/delete.sh [--env FILE] [--dry-run] [--yes]

Deletes TPU_NAME in ZONE of PROJECT; with QUEUED=true deletes the queued resource
TPU_NAME with --force, which deletes its node too. Asks first unless --yes.
Everything on the workers' disks (the clone, the venv, ~/instructrl-logs) goes with
it; checkpoints and metrics in a gs:// workdir stay."
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_common_args "$@"
yes=false
for option in ${OPTS[@]+"${OPTS[@]}"}; do
  case "$option" in
    --yes | -y) yes=true ;;
    *) die "unknown option '$option' (see --help)" ;;
  esac
done
if $HAS_PASSTHRU; then
  die "delete.sh takes no command after -- (see --help)"
fi
load_env
require PROJECT ZONE TPU_NAME

if is_bool_var QUEUED; then
  what="queued resource $TPU_NAME (and its TPU)"
  cmd=(gcloud compute tpus queued-resources delete "$TPU_NAME" "--project=$PROJECT"
    "--zone=$ZONE" --force --quiet)
else
  what="TPU $TPU_NAME"
  cmd=(gcloud compute tpus tpu-vm delete "$TPU_NAME" "--project=$PROJECT" "--zone=$ZONE"
    --quiet)
fi

if ! $DRY_RUN && ! $yes; then
  printf 'Delete %s in %s (project %s)? [y/N] ' "$what" "$ZONE" "$PROJECT" >&2
  answer=""
  read -r answer || true
  case "$answer" in
    y | Y | yes | YES) ;;
    *) die "not deleted (answer y, or pass --yes)" ;;
  esac
fi
run_cmd "${cmd[@]}"
