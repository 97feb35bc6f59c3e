#!/usr/bin/env bash
# Starts `python -m instructrl.main --distributed ARGS` on every worker of the TPU, in
# the background (setsid + nohup), one log per worker:
#   ~/instructrl-logs/<run>/worker-<hostname>.log   (appended to on every launch)
#   ~/instructrl-logs/<run>/worker-<hostname>.pid
# Re-running the same launch resumes: every stage restarts from its latest checkpoint
# in the workdir and finished stages are skipped.
set -euo pipefail
USAGE="usage: gcp/launch.sh [--env FILE] [--dry-run] [--run-name NAME] -- --config=experiments/X.py[:ARGS] [--workdir=DIR] [--config.KEY=VALUE ...]

Runs python -m instructrl.main --distributed ARGS on all workers of TPU_NAME, from
~/instructrl with ~/instructrl/.venv (see gcp/setup.sh).

The run name (--run-name, else RUN_NAME from the environment or the env file, else
the config file's name plus its :ARGS) names the log folder ~/instructrl-logs/<run>
on each worker. Without --workdir the workdir is BUCKET/runs/<run>. The workdir
should be a gs:// path: every worker of a pod slice must see the same checkpoints."
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_common_args "$@"
run_name_flag=""
i=0
while ((i < ${#OPTS[@]})); do
  case "${OPTS[i]}" in
    --run-name)
      ((i + 1 < ${#OPTS[@]})) || die "--run-name needs a NAME"
      run_name_flag=${OPTS[i + 1]}
      i=$((i + 2))
      ;;
    --run-name=*)
      run_name_flag=${OPTS[i]#--run-name=}
      i=$((i + 1))
      ;;
    *) die "unknown option '${OPTS[i]}'; training arguments go after -- (see --help)" ;;
  esac
done
if ! $HAS_PASSTHRU || ((${#PASSTHRU[@]} == 0)); then
  die "no training arguments; usage: gcp/launch.sh -- --config=experiments/X.py [--workdir=gs://...]"
fi
load_env
require PROJECT ZONE TPU_NAME

config=""
workdir=""
has_distributed=false
for ((i = 0; i < ${#PASSTHRU[@]}; i++)); do
  case "${PASSTHRU[i]}" in
    --config=*) config=${PASSTHRU[i]#--config=} ;;
    --config) config=${PASSTHRU[i + 1]-} ;;
    --workdir=*) workdir=${PASSTHRU[i]#--workdir=} ;;
    --workdir) workdir=${PASSTHRU[i + 1]-} ;;
    --distributed) has_distributed=true ;;
  esac
done
[[ -n $config ]] || die "no --config=experiments/X.py among the arguments after --"

if [[ -n $run_name_flag ]]; then
  run_name=$run_name_flag
elif [[ -n ${RUN_NAME-} ]]; then
  run_name=$RUN_NAME
else
  # experiments/instructgpt_1p3b.py:size=small,smoke -> instructgpt_1p3b-size-small-smoke
  config_file=${config%%:*}
  run_name=${config_file##*/}
  run_name=${run_name%.py}
  if [[ $config == *:* ]]; then
    config_args=${config#*:}
    run_name="$run_name-${config_args//[^A-Za-z0-9._-]/-}"
  fi
fi
check_run_name "$run_name"

args=()
if ! $has_distributed; then
  args+=(--distributed)
fi
args+=("${PASSTHRU[@]}")
if [[ -z $workdir ]]; then
  require BUCKET
  workdir="${BUCKET%/}/runs/$run_name"
  args+=("--workdir=$workdir")
fi
if [[ $workdir != gs://* ]]; then
  info "warning: workdir '$workdir' is not on gs://; on a multi-host slice each worker would write its own copy"
fi

quote_words "${args[@]}"
q_args=$QUOTED

# One line of bash for each worker's login shell; $HOME, $log etc. expand there.
# shellcheck disable=SC2016
remote=(
  'set -euo pipefail'
  'cd "$HOME/instructrl"'
  '[ -x .venv/bin/python ] || { echo "$(hostname): no ~/instructrl/.venv; run gcp/setup.sh first" >&2; exit 1; }'
  "run=$run_name"
  'log_dir="$HOME/instructrl-logs/$run"'
  'log="$log_dir/worker-$(hostname).log"'
  'pid_file="$log_dir/worker-$(hostname).pid"'
  'mkdir -p "$log_dir"'
  'pid=$(cat "$pid_file" 2>/dev/null || true)'
  'if [ -n "$pid" ] && grep -qa instructrl.main "/proc/$pid/cmdline" 2>/dev/null; then'
  '  echo "$(hostname): run $run is still running (pid $pid); stop it first with gcp/stop.sh --run $run" >&2'
  '  exit 1'
  'fi'
  "{ printf \"=== %s %s launch:\" \"\$(date -u +%Y-%m-%dT%H:%M:%SZ)\" \"\$(hostname)\"; printf \" %s\" $q_args; echo; } >>\"\$log\""
  "RUN_NAME=\"\$run\" PYTHONUNBUFFERED=1 setsid nohup .venv/bin/python -m instructrl.main $q_args >>\"\$log\" 2>&1 </dev/null &"
  'echo $! >"$pid_file"'
  'echo "$(hostname): started run $run (pid $!), log $log"'
)
join_script "${remote[@]}"
gcloud_ssh all "$SCRIPT"
if ! $DRY_RUN; then
  info "follow with: gcp/logs.sh --run $run_name --follow   (workdir $workdir)"
fi
