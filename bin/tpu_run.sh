#!/usr/bin/env bash
# Runs one experiment config on every worker of a Cloud TPU VM slice at once (multi-host JAX).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bin/tpu_run.sh --tpu NAME --zone ZONE [--project PROJECT] [--repo DIR] [--python PY]
                      [--install] [--dry-run] [-h|--help] CONFIG [FLAG...]

Runs, on every worker of the TPU VM slice NAME at the same time,

  cd DIR && PY -m jretrieval.main --config=CONFIG --config.distributed.multihost=True FLAG...

through `gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command=...`. Each
worker is one JAX process: jax.distributed.initialize() finds the others from the TPU
environment, every process decodes and encodes its slice of the images, and the descriptors
are gathered so that process 0 writes each descriptor store once and the report (results on
process 0, in config.output.dir or <workdir>/results). Put the data, the converted checkpoints
and the workdir where every worker reads the same files (the same paths on each worker, e.g. a
shared filesystem or a copy on each), or pass absolute paths with FLAGs.

  --tpu NAME         the TPU VM (gcloud compute tpus tpu-vm list)
  --zone ZONE        its zone, e.g. us-central2-b
  --project PROJECT  its project (default: gcloud's configured project)
  --repo DIR         the repository on the workers (default: jretrieval, in the remote home)
  --python PY        the workers' interpreter (default: python3)
  --install          first run `PY -m pip install -e ".[tpu]"` in DIR on every worker
  --dry-run          print the gcloud command(s), run nothing
  CONFIG             a config file as the workers see it, e.g. configs/oxford.py
  FLAG...            more flags for jretrieval.main, e.g. --config.models=baseline
  GCLOUD             environment variable: the gcloud command (default: gcloud)
EOF
}

TPU=""
ZONE=""
PROJECT=""
REPO_DIR="jretrieval"
PY="python3"
INSTALL=0
DRY=0
need() { [[ $2 -ge 2 ]] || { echo "tpu_run.sh: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu) need "$1" $#; TPU="$2"; shift 2 ;;
    --zone) need "$1" $#; ZONE="$2"; shift 2 ;;
    --project) need "$1" $#; PROJECT="$2"; shift 2 ;;
    --repo) need "$1" $#; REPO_DIR="$2"; shift 2 ;;
    --python) need "$1" $#; PY="$2"; shift 2 ;;
    --install) INSTALL=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "tpu_run.sh: unknown option '$1' (flags for jretrieval.main go after CONFIG)" >&2
        exit 2 ;;
    *) break ;;
  esac
done
if [[ -z "$TPU" || -z "$ZONE" ]]; then
  echo "tpu_run.sh: --tpu NAME and --zone ZONE are required (see -h)" >&2
  exit 2
fi
if [[ $# -lt 1 ]]; then
  echo "tpu_run.sh: expected a config file, e.g. configs/oxford.py (see -h)" >&2
  exit 2
fi
CONFIG="$1"
shift
GCLOUD="${GCLOUD:-gcloud}"

# quoted WORD...: the words as one shell line (single quotes where needed), readable when printed.
quoted() {
  local out=() word q="'"
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
      out+=("$word")
    else
      out+=("$q${word//$q/$q\\$q$q}$q")
    fi
  done
  echo "${out[*]}"
}

# The remote command is one string for the workers' shell: every word quoted for it.
main_cmd="cd $(quoted "$REPO_DIR") && $(quoted "$PY" -m jretrieval.main "--config=$CONFIG" \
  --config.distributed.multihost=True "$@")"
install_cmd="cd $(quoted "$REPO_DIR") && $(quoted "$PY" -m pip install -e '.[tpu]')"

ssh_all() {  # remote-command: runs it on every worker, or prints the gcloud line
  local cmd=("$GCLOUD" compute tpus tpu-vm ssh "$TPU" "--zone=$ZONE")
  [[ -n "$PROJECT" ]] && cmd+=("--project=$PROJECT")
  cmd+=(--worker=all "--command=$1")
  if [[ $DRY -eq 1 ]]; then
    quoted "${cmd[@]}"
  else
    "${cmd[@]}"
  fi
}

[[ $INSTALL -eq 1 ]] && ssh_all "$install_cmd"
ssh_all "$main_cmd"
