#!/usr/bin/env bash
# Runs the paper's three tables for every model: one `python -m jretrieval.main` per config.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bin/paper_tables.sh [--tables 1,2,3] [--models LIST] [--data DIR] [--checkpoint-dir DIR]
                           [--out DIR] [--force] [--dry-run] [-h|--help] [-- FLAG...]

Runs the paper's tables (Krishna et al., ICMR 2021) with `python -m jretrieval.main`, one run
per dataset, every model and ensemble of configs/common.py unless --models is given:

  Table 1  configs/oxford.py, configs/paris.py, configs/instre.py   (8 ranking columns, mAP)
  Table 2  configs/roxford.py, configs/rparis.py          (global search, E/M/H mAP, mP@5/10)
  Table 3  configs/table3.py:oxford5k, :paris6k, :instre   (PCA dims 32..2048 and no PCA)

Each run writes its report (table.md, results.json, results.csv; Table 3 also a plot) to
OUT/table<N>/<dataset>/ (default OUT: runs/paper); descriptors and BN statistics are cached
under runs/<dataset>/ and shared between tables, so Table 3 after Table 1 only re-ranks. A run
whose results.json exists is skipped (--force runs it again). A failed run is reported and the
next one starts; the exit status is 1 if any failed.

BN recalibration is the paper's procedure by default (bn.mode=pytorch: a model.train() pass,
running averages with momentum 0.1); `-- --config.bn.mode=exact` uses population statistics
instead (this project's improvement; numbers then differ slightly from the paper's procedure).

Prerequisites: bin/download_datasets.sh, bin/download_checkpoints.sh, bin/convert_checkpoints.sh.

  --tables LIST          comma-separated subset of 1,2,3 (default: 1,2,3)
  --models LIST          comma-separated rows, e.g. baseline,simclr2x+simclr4x
                         (--config.models; default: each config's own)
  --data DIR             --config.data.root (default: the configs' "data")
  --checkpoint-dir DIR   --config.checkpoint_dir (default: the configs' "converted", where bin/convert_checkpoints.sh writes)
  --out DIR              where the reports go (default: runs/paper in the repository)
  --force                run again even when a report exists
  --dry-run              print the commands, run nothing
  -- FLAG...             passed to every run, e.g. -- --config.bn.mode=exact
  PYTHON                 environment variable: the interpreter (default: python)
EOF
}

TABLES="1,2,3"
MODELS=""
DATA=""
CKPT=""
OUT="runs/paper"
FORCE=0
DRY=0
EXTRA=()
need() { [[ $2 -ge 2 ]] || { echo "paper_tables.sh: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tables) need "$1" $#; TABLES="$2"; shift 2 ;;
    --models) need "$1" $#; MODELS="$2"; shift 2 ;;
    --data) need "$1" $#; DATA="$2"; shift 2 ;;
    --checkpoint-dir) need "$1" $#; CKPT="$2"; shift 2 ;;
    --out) need "$1" $#; OUT="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "paper_tables.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

# user paths are relative to the caller's folder; the runs start in the repository root
abspath() { if [[ -z "$1" || "$1" == /* ]]; then echo "$1"; else echo "$PWD/$1"; fi; }
[[ "$OUT" != runs/paper ]] && OUT="$(abspath "$OUT")"
DATA="$(abspath "$DATA")"
CKPT="$(abspath "$CKPT")"
PYTHON="${PYTHON:-python}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

# table|config argument|dataset
RUNS=()
IFS=',' read -r -a WANTED <<<"$TABLES"
for t in "${WANTED[@]}"; do
  case "$t" in
    1) RUNS+=("1|configs/oxford.py|oxford5k" "1|configs/paris.py|paris6k"
              "1|configs/instre.py|instre") ;;
    2) RUNS+=("2|configs/roxford.py|roxford5k" "2|configs/rparis.py|rparis6k") ;;
    3) RUNS+=("3|configs/table3.py:oxford5k|oxford5k" "3|configs/table3.py:paris6k|paris6k"
              "3|configs/table3.py:instre|instre") ;;
    *) echo "paper_tables.sh: --tables '$TABLES': expected numbers among 1,2,3" >&2; exit 2 ;;
  esac
done

ran=0
skipped=0
failed=()
for run in "${RUNS[@]}"; do
  IFS='|' read -r table config dataset <<<"$run"
  out="$OUT/table$table/$dataset"
  cmd=("$PYTHON" -m jretrieval.main "--config=$config" "--config.output.dir=$out")
  [[ -n "$MODELS" ]] && cmd+=("--config.models=$MODELS")
  [[ -n "$DATA" ]] && cmd+=("--config.data.root=$DATA")
  [[ -n "$CKPT" ]] && cmd+=("--config.checkpoint_dir=$CKPT")
  cmd+=(${EXTRA[@]+"${EXTRA[@]}"})
  if [[ $FORCE -eq 0 && -f "$out/results.json" ]]; then
    echo "skip table $table $dataset ($out/results.json exists; --force to run again)"
    skipped=$((skipped + 1))
    continue
  fi
  if [[ $DRY -eq 1 ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    continue
  fi
  echo "== table $table, $dataset: ${cmd[*]}"
  if "${cmd[@]}"; then
    ran=$((ran + 1))
  else
    echo "paper_tables.sh: table $table $dataset failed (exit $?)" >&2
    failed+=("table$table/$dataset")
  fi
done

if [[ $DRY -eq 0 ]]; then
  echo "ran $ran, skipped $skipped, failed ${#failed[@]}${failed[*]:+: ${failed[*]}}"
  echo "reports: $OUT/table*/<dataset>/table.md"
fi
[[ ${#failed[@]} -eq 0 ]]
