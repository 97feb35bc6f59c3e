#!/usr/bin/env bash
# Creates the TPU VM (or, with QUEUED=true, a queued resource that becomes one).
set -euo pipefail
USAGE="usage: gcp/create.sh [--env FILE] [--dry-run]

Creates TPU_NAME (ACCELERATOR_TYPE, RUNTIME_VERSION) in ZONE of PROJECT.
SPOT=true asks for Spot capacity; QUEUED=true goes through a queued resource
named TPU_NAME whose single node is also TPU_NAME."
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_common_args "$@"
if ((${#OPTS[@]} > 0)) || $HAS_PASSTHRU; then
  die "unexpected argument '${OPTS[0]:---}' (see --help)"
fi
load_env
require PROJECT ZONE TPU_NAME ACCELERATOR_TYPE RUNTIME_VERSION

extra=()
if is_bool_var SPOT; then
  extra+=(--spot)
fi

if is_bool_var QUEUED; then
  run_cmd gcloud compute tpus queued-resources create "$TPU_NAME" "--project=$PROJECT" \
    "--zone=$ZONE" "--node-id=$TPU_NAME" "--accelerator-type=$ACCELERATOR_TYPE" \
    "--runtime-version=$RUNTIME_VERSION" ${extra[@]+"${extra[@]}"}
  if ! $DRY_RUN; then
    info "queued; gcp/setup.sh works once the state is ACTIVE:"
    info "  gcloud compute tpus queued-resources describe $TPU_NAME --project=$PROJECT --zone=$ZONE --format='value(state.state)'"
  fi
else
  run_cmd gcloud compute tpus tpu-vm create "$TPU_NAME" "--project=$PROJECT" \
    "--zone=$ZONE" "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION" \
    ${extra[@]+"${extra[@]}"}
  if ! $DRY_RUN; then
    info "created; next: gcp/setup.sh"
  fi
fi
