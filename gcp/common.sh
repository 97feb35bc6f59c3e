# shellcheck shell=bash
# The globals set here (OPTS, PASSTHRU, SCRIPT, ...) are read by the sourcing scripts:
# shellcheck disable=SC2034
# Sourced by every gcp/*.sh script. Not meant to be run on its own.
#
# Provides:
#   parse_common_args "$@"   handles --env FILE, --dry-run, -h/--help and `--`;
#                            leaves the script's own options in OPTS and whatever
#                            follows `--` in PASSTHRU (HAS_PASSTHRU=true if `--` was given)
#   load_env                 reads the env file (gcp/env, or the --env FILE)
#   require VAR...           one-line error naming the first unset variable
#   run_cmd CMD ARGS...      prints the command (--dry-run) or prints it to stderr and runs it
#   quote_word WORD          sets QUOTED to WORD quoted for bash (only where needed)
#   quote_words WORDS...     sets QUOTED to the words, quoted and joined by spaces
#   join_script LINE...      sets SCRIPT to the lines joined into one line of bash
#   gcloud_ssh WORKER CMD    `gcloud compute tpus tpu-vm ssh` on the TPU with --command
#
# Works with bash 3.2 (macOS) and later: no associative arrays, no mapfile, and
# possibly-empty arrays are expanded as ${a[@]+"${a[@]}"}.

GCP_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SCRIPT_NAME="$(basename "$0")"

# Every variable the env file may set. They are cleared before the file is read, so
# a variable exported in the caller's shell never stands in for a missing line.
CONFIG_VARS=(PROJECT ZONE ACCELERATOR_TYPE RUNTIME_VERSION TPU_NAME BUCKET REPO_URL BRANCH
  SPOT QUEUED PYTHON_VERSION)

DRY_RUN=false
ENV_FILE=""
ENV_FILE_USED=""
HAS_PASSTHRU=false
OPTS=()
PASSTHRU=()

die() {
  echo "$SCRIPT_NAME: error: $*" >&2
  exit 1
}

info() {
  echo "$SCRIPT_NAME: $*" >&2
}

parse_common_args() {
  while (($# > 0)); do
    case "$1" in
      --env)
        (($# >= 2)) || die "--env needs a FILE"
        ENV_FILE=$2
        shift 2
        ;;
      --env=*)
        ENV_FILE=${1#--env=}
        shift
        ;;
      --dry-run)
        DRY_RUN=true
        shift
        ;;
      -h | --help)
        printf '%s\n' "${USAGE:-usage: $SCRIPT_NAME [--env FILE] [--dry-run]}"
        exit 0
        ;;
      --)
        shift
        HAS_PASSTHRU=true
        PASSTHRU=("$@")
        break
        ;;
      *)
        OPTS+=("$1")
        shift
        ;;
    esac
  done
}

is_bool_var() { # is_bool_var NAME: true if NAME is "true"; false if "false" or unset
  local value=${!1-}
  case "$value" in
    true) return 0 ;;
    false | "") return 1 ;;
    *) die "$1 must be true or false (got '$value') in $ENV_FILE_USED" ;;
  esac
}

load_env() {
  local file=$ENV_FILE
  if [[ -z $file ]]; then
    file="$GCP_DIR/env"
    [[ -f $file ]] || die "no env file: copy gcp/env.example to gcp/env and fill it in, or pass --env FILE"
  fi
  [[ -f $file ]] || die "env file '$file' not found"
  ENV_FILE_USED=$file

  # RUN_NAME may come from the caller's shell (RUN_NAME=x gcp/launch.sh ...); it wins
  # over a RUN_NAME line in the env file.
  local shell_run_name=${RUN_NAME-}
  unset "${CONFIG_VARS[@]}"
  # shellcheck source=/dev/null
  source "$file" || die "could not read env file '$file'"
  if [[ -n $shell_run_name ]]; then
    RUN_NAME=$shell_run_name
  fi

  # Checked here, whichever script runs, so that a typo is caught early.
  is_bool_var SPOT || true
  is_bool_var QUEUED || true
  if [[ -n ${BUCKET-} && $BUCKET != gs://* ]]; then
    die "BUCKET must look like gs://NAME (got '$BUCKET') in $file"
  fi
}

require() {
  local name
  for name in "$@"; do
    [[ -n ${!name-} ]] || die "$name is not set in $ENV_FILE_USED (see gcp/env.example)"
  done
}

# Quoting. A word made only of characters that no shell treats specially is printed as
# is; `--flag=value` keeps the flag bare and quotes the value; anything else is put in
# single quotes (a ' inside becomes '\''). The result pastes back into bash or zsh as
# exactly the same word.
SAFE_WORD_RE='^[A-Za-z0-9_@%+=:,./-]+$'
FLAG_VALUE_RE='^(--[A-Za-z0-9][A-Za-z0-9_.-]*=)(.*)$'

_single_quote() {
  local sq="'" escaped="'\\''"
  local body=${1//$sq/$escaped}
  QUOTED="'$body'"
}

quote_word() {
  local word=$1
  if [[ $word =~ $SAFE_WORD_RE ]]; then
    QUOTED=$word
  elif [[ $word =~ $FLAG_VALUE_RE ]]; then
    local flag=${BASH_REMATCH[1]} value=${BASH_REMATCH[2]}
    if [[ -n $value && $value =~ $SAFE_WORD_RE ]]; then
      QUOTED=$word
    else
      _single_quote "$value"
      QUOTED="$flag$QUOTED"
    fi
  else
    _single_quote "$word"
  fi
}

quote_words() {
  local out="" word
  for word in "$@"; do
    quote_word "$word"
    out="$out${out:+ }$QUOTED"
  done
  QUOTED=$out
}

run_cmd() {
  quote_words "$@"
  if $DRY_RUN; then
    printf '%s\n' "$QUOTED"
  else
    printf '+ %s\n' "$QUOTED" >&2
    "$@"
  fi
}

# join_script LINE...: sets SCRIPT to the lines as one line of bash, joined by "; "
# (by a space after `then`, `else`, `do` and a trailing `&`). Leading indentation is
# dropped.
join_script() {
  local out="" line
  for line in "$@"; do
    line=${line#"${line%%[! ]*}"}
    if [[ -z $out ]]; then
      out=$line
    elif [[ $out == *' then' || $out == *' else' || $out == *' do' || $out == *' &' ]]; then
      out="$out $line"
    else
      out="$out; $line"
    fi
  done
  SCRIPT=$out
}

# gcloud_ssh WORKER REMOTE_COMMAND: the same command on one worker, a list, or all.
gcloud_ssh() {
  run_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" "--project=$PROJECT" "--zone=$ZONE" \
    "--worker=$1" "--command=$2"
}

# Checks a --worker value: `all`, N, or (with a command) a list/range such as 0,2 or 1-3.
check_worker() {
  local worker=$1 allow_many=$2 one='^[0-9]+$' many='^(all|[0-9]+([,-][0-9]+)*)$'
  if [[ $worker =~ $one ]]; then
    return 0
  fi
  if $allow_many && [[ $worker =~ $many ]]; then
    return 0
  fi
  if $allow_many; then
    die "--worker must be all, a worker number, or a list such as 0,2 or 1-3 (got '$worker')"
  fi
  die "--worker must be a worker number for an interactive shell (got '$worker'); pass -- CMD to run a command on several"
}

# Run names become folder names on the workers and in the bucket.
RUN_NAME_RE='^[A-Za-z0-9][A-Za-z0-9._-]*$'
check_run_name() {
  [[ $1 =~ $RUN_NAME_RE ]] || die "run name '$1' may only hold letters, digits, '.', '_' and '-'"
}
