#!/usr/bin/env bash
# Shows (or follows) the per-worker logs that gcp/launch.sh writes:
#   ~/instructrl-logs/<run>/worker-<hostname>.log
set -euo pipefail
USAGE="usage: gcp/logs.sh [--env FILE] [--dry-run] [--worker all|N] [--follow] [--run NAME] [--lines N]

Prints the last N (default 100) lines of a run's log on worker N (default 0) or on
all workers (each line prefixed with the worker's hostname), and with --follow keeps
printing new lines until Ctrl-C. The run is --run NAME, else RUN_NAME from the
environment or the env file, else the newest folder in ~/instructrl-logs."
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_common_args "$@"
worker=0
follow=false
run_flag=""
lines=100
i=0
while ((i < ${#OPTS[@]})); do
  option=${OPTS[i]}
  case "$option" in
    --follow | -f)
      follow=true
      i=$((i + 1))
      continue
      ;;
    --worker=* | --run=* | --lines=*)
      name=${option%%=*}
      value=${option#*=}
      i=$((i + 1))
      ;;
    --worker | --run | --lines)
      ((i + 1 < ${#OPTS[@]})) || die "$option needs a value"
      name=$option
      value=${OPTS[i + 1]}
      i=$((i + 2))
      ;;
    *) die "unknown option '$option' (see --help)" ;;
  esac
  case "$name" in
    --worker) worker=$value ;;
    --run) run_flag=$value ;;
    --lines) lines=$value ;;
  esac
done
if $HAS_PASSTHRU; then
  die "logs.sh takes no command after -- (see --help)"
fi
load_env
require PROJECT ZONE TPU_NAME

check_worker "$worker" true
[[ $lines =~ ^[0-9]+$ ]] || die "--lines must be a number (got '$lines')"
run=${run_flag:-${RUN_NAME-}}
if [[ -n $run ]]; then
  check_run_name "$run"
fi

tail_cmd="tail -n $lines"
if $follow; then
  tail_cmd="$tail_cmd -F"
fi
tail_cmd="$tail_cmd \"\$logs/\$run/worker-\$(hostname).log\""
if [[ ! $worker =~ ^[0-9]+$ ]]; then
  # Several workers print at once: say which line came from which.
  tail_cmd="$tail_cmd | sed -u \"s/^/\$(hostname): /\""
fi

# shellcheck disable=SC2016
remote=(
  'set -euo pipefail'
  'logs="$HOME/instructrl-logs"'
  "run=\"$run\""  # checked above: empty, or letters, digits and ._-
  'if [ -z "$run" ]; then run=$(ls -t "$logs" 2>/dev/null | head -n 1 || true); fi'
  'if [ -z "$run" ]; then echo "$(hostname): no runs in $logs" >&2; exit 1; fi'
  "$tail_cmd"
)
join_script "${remote[@]}"
gcloud_ssh "$worker" "$SCRIPT"
