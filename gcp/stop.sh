#!/usr/bin/env bash
# Stops a run started by gcp/launch.sh: SIGTERM to its process on every worker. The
# training stages save a checkpoint on SIGTERM, so the same launch resumes from there.
set -euo pipefail
USAGE="usage: gcp/stop.sh [--env FILE] [--dry-run] [--run NAME]

Sends SIGTERM to the run's python process on all workers. The run is --run NAME,
else RUN_NAME from the environment or the env file, else the newest folder in
~/instructrl-logs. Only a process whose pid file says so and whose command line is
instructrl.main is signalled."
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_common_args "$@"
run_flag=""
i=0
while ((i < ${#OPTS[@]})); do
  case "${OPTS[i]}" in
    --run)
      ((i + 1 < ${#OPTS[@]})) || die "--run needs a NAME"
      run_flag=${OPTS[i + 1]}
      i=$((i + 2))
      ;;
    --run=*)
      run_flag=${OPTS[i]#--run=}
      i=$((i + 1))
      ;;
    *) die "unknown option '${OPTS[i]}' (see --help)" ;;
  esac
done
if $HAS_PASSTHRU; then
  die "stop.sh takes no command after -- (see --help)"
fi
load_env
require PROJECT ZONE TPU_NAME
run=${run_flag:-${RUN_NAME-}}
if [[ -n $run ]]; then
  check_run_name "$run"
fi

# shellcheck disable=SC2016
remote=(
  'set -euo pipefail'
  'logs="$HOME/instructrl-logs"'
  "run=\"$run\""  # checked above: empty, or letters, digits and ._-
  'if [ -z "$run" ]; then run=$(ls -t "$logs" 2>/dev/null | head -n 1 || true); fi'
  'pid=$(cat "$logs/$run/worker-$(hostname).pid" 2>/dev/null || true)'
  'if [ -n "$run" ] && [ -n "$pid" ] && grep -qa instructrl.main "/proc/$pid/cmdline" 2>/dev/null; then'
  '  kill -TERM "$pid"'
  '  echo "$(hostname): sent SIGTERM to run $run (pid $pid)"'
  'else'
  '  echo "$(hostname): run ${run:-?} is not running"'
  'fi'
)
join_script "${remote[@]}"
gcloud_ssh all "$SCRIPT"
