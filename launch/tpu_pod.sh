#!/usr/bin/env bash
# Cloud TPU VM slices (v4 / v5e / v5p / v6e, one host or a pod) with gcloud: create, set up, run
# iv2 on every host at once, delete. See README "Running on a pod or cluster".
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
  cat <<'EOF'
usage: bash launch/tpu_pod.sh [OPTIONS] COMMAND [ARGS]

commands:
  create                     create the slice (gcloud compute tpus tpu-vm create)
  setup                      put this code on every worker, then `bash launch/setup.sh tpu` there:
                             a tarball of this checkout (git-tracked + untracked, not ignored),
                             or, with IV2_GIT_URL, a git clone of IV2_GIT_URL at IV2_GIT_REF
  run [--detach] -- ARGS...  run `.venv/bin/iv2 ARGS...` on every worker at once, with
                             launch/flags.sh's TPU flags. Foreground: logs to
                             runs/tpu_logs/NAME-TIME/<worker>.log here; Ctrl-C ends the run.
                             --detach: survives this terminal; logs to ~/iv2_logs/ on each worker
  logs [WORKER]              follow the newest detached log of a worker (default 0)
  stop                       SIGTERM a detached run on every worker (run it again to resume)
  ssh [WORKER|all] [-- CMD]  a shell on a worker (default 0), or run CMD there / on all workers
  delete                     delete the slice

options (or the environment variable in brackets):
  --name NAME        slice name [IV2_TPU_NAME]; required
  --zone ZONE        zone [IV2_TPU_ZONE]; default: gcloud config compute/zone
  --project PROJECT  project [IV2_TPU_PROJECT]; default: gcloud config core/project
  --type TYPE        accelerator type, e.g. v5p-256, v6e-256, v5litepod-64 [IV2_TPU_TYPE]; create
                     needs it, run reads it from the slice when unset
  --version VERSION  runtime version [IV2_TPU_VERSION]; default by type: v2-alpha-tpuv5 (v5p),
                     v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv6e (v6e), tpu-ubuntu2204-base (v4)
other environment:
  IV2_TPU_CREATE_ARGS  extra create flags, e.g. "--spot" or "--reserved"
  IV2_REMOTE_DIR       code directory on the workers, relative to home (default internvideo2-jax)
  IV2_GIT_URL, IV2_GIT_REF  setup from git instead of this checkout (ref default: HEAD)
  IV2_DRY_RUN=1        print the gcloud commands instead of running them

example (the workdir must be a gs:// path every host writes to; see README):
  export IV2_TPU_NAME=iv2-pod IV2_TPU_ZONE=us-east5-a IV2_TPU_TYPE=v5p-256
  bash launch/tpu_pod.sh create && bash launch/tpu_pod.sh setup
  bash launch/tpu_pod.sh run --detach -- --config=configs/stage2.py:size=6B \
      --workdir=gs://BUCKET/runs/s2_6b \
      --config.data.corpora='({"format": "array_record", "path": "gs://BUCKET/shards"},)'
Commands on all workers need your gcloud ssh key in the agent: ssh-add ~/.ssh/google_compute_engine
EOF
}

die() { echo "tpu_pod: $*" >&2; exit 1; }
q() { printf '%q' "$1"; }

NAME=${IV2_TPU_NAME:-}
ZONE=${IV2_TPU_ZONE:-}
PROJECT=${IV2_TPU_PROJECT:-}
TYPE=${IV2_TPU_TYPE:-}
VERSION=${IV2_TPU_VERSION:-}
CMD=""
REST=()
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --name | --zone | --project | --type | --version)
      [ $# -ge 2 ] || die "$1 needs a value"
      opt=${1#--}; val=$2; shift 2 ;;
    --name=* | --zone=* | --project=* | --type=* | --version=*)
      opt=${1%%=*}; opt=${opt#--}; val=${1#*=}; shift ;;
    --)
      REST+=("$@"); break ;;
    *)
      if [ -z "$CMD" ]; then CMD=$1; else REST+=("$1"); fi
      shift; continue ;;
  esac
  case $opt in
    name) NAME=$val ;; zone) ZONE=$val ;; project) PROJECT=$val ;;
    type) TYPE=$val ;; version) VERSION=$val ;;
  esac
done
[ -n "$CMD" ] || { usage >&2; exit 2; }
[ -n "$NAME" ] || die "no slice name: --name NAME or IV2_TPU_NAME"
set -- ${REST[@]+"${REST[@]}"}

LOC=()
[ -n "$ZONE" ] && LOC+=(--zone "$ZONE")
[ -n "$PROJECT" ] && LOC+=(--project "$PROJECT")
DIR=${IV2_REMOTE_DIR:-internvideo2-jax}
DIR=${DIR#\~/}   # ssh starts in the home directory; a quoted ~ would not expand there

tpu() {
  if [ "${IV2_DRY_RUN:-0}" = 1 ]; then
    printf '+ gcloud compute tpus tpu-vm'; printf ' %q' "$@"; printf '\n'
  else
    gcloud compute tpus tpu-vm "$@"
  fi
}

need_agent() {
  [ "${IV2_DRY_RUN:-0}" = 1 ] && return 0
  ssh-add -l >/dev/null 2>&1 ||
    echo "tpu_pod: note: no key in ssh-agent; --worker=all needs: ssh-add ~/.ssh/google_compute_engine" >&2
}

# on_workers WORKERS SCRIPT [gcloud ssh args...]: runs SCRIPT with bash on the workers.
on_workers() {
  local workers=$1 script=$2
  shift 2
  tpu ssh "$NAME" ${LOC[@]+"${LOC[@]}"} --worker="$workers" --command "bash -c $(q "$script")" "$@"
}

default_version() {
  case $1 in
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    v4-* | v3-* | v2-*) echo tpu-ubuntu2204-base ;;
    *) die "no default runtime version for type '$1': pass --version (gcloud compute tpus tpu-vm versions list)" ;;
  esac
}

# Runs on each worker after the code is in place (variables are prepended by cmd_setup).
read -r -d '' SETUP_REMOTE <<'EOF' || true
set -euo pipefail
if [ "$IV2_SRC" = git ]; then
  [ -d "$IV2_DIR/.git" ] || git clone -q "$IV2_GIT_URL" "$IV2_DIR"
  git -C "$IV2_DIR" fetch -q origin "$IV2_GIT_REF"
  git -C "$IV2_DIR" checkout -q --detach FETCH_HEAD
else
  mkdir -p "$IV2_DIR"
  tar -xzf "$HOME/iv2-src.tgz" -C "$IV2_DIR"
  rm -f "$HOME/iv2-src.tgz"
fi
cd "$IV2_DIR"
py_ok() { command -v "$1" >/dev/null 2>&1 && "$1" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; }
if [ -z "${IV2_PYTHON:-}" ] && ! py_ok python3.12 && ! py_ok python3.13 && ! py_ok python3; then
  # TPU VM images ship Ubuntu 22.04's Python 3.10; jax >= 0.11 needs 3.12: let uv fetch one.
  export PATH="$HOME/.local/bin:$PATH"
  command -v uv >/dev/null 2>&1 || python3 -m pip install -q --user uv ||
    python3 -m pip install -q --user --break-system-packages uv
  uv python install 3.12
  IV2_PYTHON=$(uv python find --python-preference only-managed 3.12)
  export IV2_PYTHON
fi
bash launch/setup.sh tpu
echo "$(hostname): ready in $PWD"
EOF

cmd_create() {
  [ -n "$TYPE" ] || die "create needs the accelerator type: --type v5p-256 (or IV2_TPU_TYPE)"
  local version=$VERSION extra=()
  [ -n "$version" ] || version=$(default_version "$TYPE")
  read -r -a extra <<<"${IV2_TPU_CREATE_ARGS:-}"
  tpu create "$NAME" ${LOC[@]+"${LOC[@]}"} --accelerator-type="$TYPE" --version="$version" \
    ${extra[@]+"${extra[@]}"}
}

cmd_setup() {
  need_agent
  local src=tar vars
  if [ -n "${IV2_GIT_URL:-}" ]; then
    src=git
  else
    TMPD=$(mktemp -d)
    trap 'rm -rf "$TMPD"' EXIT
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
      # tracked + untracked-but-not-ignored files that exist (no .venv, runs/, data/)
      git ls-files -z -co --exclude-standard |
        while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done |
        tar --null -T - -czf "$TMPD/iv2-src.tgz"
    else
      tar --exclude=./.venv --exclude=./runs --exclude=./data --exclude=./.git -czf "$TMPD/iv2-src.tgz" .
    fi
    echo "tpu_pod: copying $(du -h "$TMPD/iv2-src.tgz" | cut -f1) of code to every worker of $NAME"
    tpu scp "$TMPD/iv2-src.tgz" "$NAME:iv2-src.tgz" ${LOC[@]+"${LOC[@]}"} --worker=all
  fi
  vars="IV2_SRC=$(q "$src") IV2_DIR=$(q "$DIR") IV2_GIT_URL=$(q "${IV2_GIT_URL:-}")"
  vars+=" IV2_GIT_REF=$(q "${IV2_GIT_REF:-HEAD}")"
  on_workers all "$vars"$'\n'"$SETUP_REMOTE"
}

cmd_run() {
  local detach=0
  if [ "${1:-}" = --detach ]; then detach=1; shift; fi
  [ "${1:-}" = -- ] && shift
  [ $# -gt 0 ] || die "run needs iv2 arguments: run [--detach] -- --config=... --workdir=gs://..."
  local a workdir=""
  for a in "$@"; do case $a in --workdir=*) workdir=${a#--workdir=} ;; esac; done
  case $workdir in
    gs://*) ;;
    "") echo "tpu_pod: warning: no --workdir=gs://...; every host must write the same workdir" >&2 ;;
    *) echo "tpu_pod: warning: --workdir=$workdir is not gs://; it must be one filesystem all hosts share" >&2 ;;
  esac
  if [ -z "$TYPE" ] && [ "${IV2_DRY_RUN:-0}" != 1 ]; then  # flags.sh adds v5e-only flags
    TYPE=$(gcloud compute tpus tpu-vm describe "$NAME" ${LOC[@]+"${LOC[@]}"} \
      --format='value(acceleratorType)' 2>/dev/null || true)
  fi
  local args="" run stamp
  for a in "$@"; do args+=" $(q "$a")"; done
  run="cd $(q "$DIR") && source launch/flags.sh && iv2_flags tpu $(q "$TYPE") && exec .venv/bin/iv2$args"
  stamp=$(date +%Y%m%d-%H%M%S)
  need_agent
  if [ "$detach" = 1 ]; then
    local log="iv2_logs/$stamp.log"
    on_workers all "mkdir -p iv2_logs
if [ -f iv2_logs/iv2.pid ] && kill -0 \"\$(cat iv2_logs/iv2.pid)\" 2>/dev/null; then
  echo \"\$(hostname): a run is still going (pid \$(cat iv2_logs/iv2.pid)); tpu_pod.sh stop first\" >&2; exit 1
fi
nohup setsid bash -c $(q "$run") >$log 2>&1 </dev/null &
echo \$! >iv2_logs/iv2.pid
ln -sfn $stamp.log iv2_logs/latest.log
echo \"\$(hostname): started pid \$!, log ~/$log\""
    echo "tpu_pod: started on every worker; follow: bash launch/tpu_pod.sh logs [WORKER]" \
      "(workers > 0 print only warnings and errors)"
  else
    local logdir=${IV2_LOG_DIR:-runs/tpu_logs}/$NAME-$stamp
    mkdir -p "$logdir"
    echo "tpu_pod: running on every worker; logs: $logdir/<worker>.log (tail -f $logdir/0.log)"
    local rc=0
    on_workers all "$run" --output-directory="$logdir" || rc=$?
    echo "tpu_pod: finished with status $rc; logs in $logdir" >&2
    return "$rc"
  fi
}

cmd_logs() {
  local worker=${1:-0}
  tpu ssh "$NAME" ${LOC[@]+"${LOC[@]}"} --worker="$worker" --command "tail -n 200 -F iv2_logs/latest.log"
}

cmd_stop() {
  need_agent
  # shellcheck disable=SC2016  # expands on the workers
  on_workers all 'if [ -f iv2_logs/iv2.pid ] && kill -0 "$(cat iv2_logs/iv2.pid)" 2>/dev/null; then
  kill -TERM -- "-$(cat iv2_logs/iv2.pid)" && echo "$(hostname): sent SIGTERM to the run"
else
  echo "$(hostname): no detached run"
fi'
}

cmd_ssh() {
  local worker=0
  if [ $# -gt 0 ] && [ "$1" != -- ]; then worker=$1; shift; fi
  [ "${1:-}" = -- ] && shift
  if [ $# -gt 0 ]; then
    [ "$worker" = all ] && need_agent
    tpu ssh "$NAME" ${LOC[@]+"${LOC[@]}"} --worker="$worker" --command "$*"
  else
    [ "$worker" = all ] && die "an interactive shell needs one worker: ssh [WORKER]"
    tpu ssh "$NAME" ${LOC[@]+"${LOC[@]}"} --worker="$worker"
  fi
}

cmd_delete() {
  tpu delete "$NAME" ${LOC[@]+"${LOC[@]}"} --quiet
}

case $CMD in
  create | setup | run | logs | stop | ssh | delete) "cmd_$CMD" "$@" ;;
  help) usage ;;
  *) usage >&2; die "unknown command '$CMD'" ;;
esac
