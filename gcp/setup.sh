#!/usr/bin/env bash
# Installs instructrl on every worker of the TPU: ~/instructrl at BRANCH of REPO_URL,
# with a virtual environment in ~/instructrl/.venv holding `pip install -e '.[tpu]'`.
# Safe to re-run: an existing clone is updated (not re-cloned) and a working venv of
# the right Python is kept; only pip runs again (fast when nothing changed).
set -euo pipefail
USAGE="usage: gcp/setup.sh [--env FILE] [--dry-run]

On all workers of TPU_NAME: clone REPO_URL into ~/instructrl (or fetch it when it is
already there), check out BRANCH (a branch or tag) as a detached HEAD, make
~/instructrl/.venv with Python PYTHON_VERSION (default 3.12; uv provides it when the
image lacks it) unless a working one exists, and pip install -e '.[tpu]'."
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_common_args "$@"
if ((${#OPTS[@]} > 0)) || $HAS_PASSTHRU; then
  die "unexpected argument '${OPTS[0]:---}' (see --help)"
fi
load_env
require PROJECT ZONE TPU_NAME REPO_URL BRANCH
python_version=${PYTHON_VERSION:-3.12}
[[ $python_version =~ ^3\.[0-9]+$ ]] || die "PYTHON_VERSION must look like 3.12 (got '$python_version')"

quote_word "$REPO_URL"
q_repo=$QUOTED
quote_word "$BRANCH"
q_branch=$QUOTED

# One line of bash, run by the login shell on each worker. $HOME, $dir etc. are
# expanded there, not here.
# shellcheck disable=SC2016
remote=(
  'set -euo pipefail'
  'export GIT_TERMINAL_PROMPT=0'
  "repo_url=$q_repo"
  "branch=$q_branch"
  "python_version=$python_version"
  'dir="$HOME/instructrl"'
  'if [ ! -d "$dir/.git" ]; then git clone --quiet "$repo_url" "$dir"; fi'
  'cd "$dir"'
  'git fetch --quiet "$repo_url" "$branch"'
  'git checkout --quiet --detach FETCH_HEAD'
  'if ! ".venv/bin/python$python_version" -V >/dev/null 2>&1; then'
  '  if [ ! -x "$HOME/.local/bin/uv" ]; then PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --user uv; fi'
  '  rm -rf .venv'
  '  "$HOME/.local/bin/uv" venv --quiet --seed --python "$python_version" .venv'
  'fi'
  '.venv/bin/pip install --quiet -e ".[tpu]"'
  'echo "$(hostname): instructrl $(git rev-parse --short HEAD) ($branch) ready in $dir"'
)
join_script "${remote[@]}"
gcloud_ssh all "$SCRIPT"
if ! $DRY_RUN; then
  info "done; next: gcp/launch.sh -- --config=experiments/...py --workdir=gs://..."
fi
