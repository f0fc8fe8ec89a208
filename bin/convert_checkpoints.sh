#!/usr/bin/env bash
# Converts every downloaded checkpoint into converted/*.h5 (python -m weight_conversion).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bin/convert_checkpoints.sh [--dir DIR] [--out DIR] [--force] [--dry-run] [-h|--help]

Converts each checkpoint that bin/download_checkpoints.sh put in --dir (default: checkpoints)
into a jretrieval encoder file in --out (default: converted), with
`python -m weight_conversion --src SRC --out OUT --format FORMAT`. Outputs newer than their
source are skipped (--force converts again); missing sources are listed and skipped.

  output                 source (in --dir)                   format
  baseline.h5            resnet50-0676ba61.pth               torchvision
  resnet101.h5           resnet101-63fe2227.pth              torchvision
  simclr1x/2x/4x.h5      resnet50-{1x,2x,4x}.pth             simclr
  mocov1.h5              moco_v1_200ep_pretrain.pth.tar      moco
  mocov2.h5              moco_v2_200ep_pretrain.pth.tar      moco
  mocov2_800ep.h5        moco_v2_800ep_pretrain.pth.tar      moco
  amdim.h5               amdim_ndf256_rkhs2048_rd10.pth      amdim
  amdim_large.h5         amdim_ndf320_rkhs2560_rd10.pth      amdim
  apgem.h5               Resnet-101-AP-GeM.pt                apgem

The names match configs/common.py's model zoo.
EOF
}

DIR=checkpoints
OUT=converted
FORCE=0
DRY=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --force) FORCE=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "convert_checkpoints.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

TABLE="
baseline|resnet50-0676ba61.pth|torchvision
resnet101|resnet101-63fe2227.pth|torchvision
simclr1x|resnet50-1x.pth|simclr
simclr2x|resnet50-2x.pth|simclr
simclr4x|resnet50-4x.pth|simclr
mocov1|moco_v1_200ep_pretrain.pth.tar|moco
mocov2|moco_v2_200ep_pretrain.pth.tar|moco
mocov2_800ep|moco_v2_800ep_pretrain.pth.tar|moco
amdim|amdim_ndf256_rkhs2048_rd10.pth|amdim
amdim_large|amdim_ndf320_rkhs2560_rd10.pth|amdim
apgem|Resnet-101-AP-GeM.pt|apgem
"

converted=0
failed=0
while IFS='|' read -r name file format; do
  [[ -z "$name" ]] && continue
  src="$DIR/$file"
  out="$OUT/$name.h5"
  if [[ ! -f "$src" ]]; then
    echo "missing $src (run bin/download_checkpoints.sh); skipping $name"
    continue
  fi
  if [[ $FORCE -eq 0 && -f "$out" && "$out" -nt "$src" ]]; then
    echo "up to date: $out"
    continue
  fi
  cmd=(python -m weight_conversion --src "$src" --out "$out" --format "$format")
  if [[ $DRY -eq 1 ]]; then
    echo "would run: ${cmd[*]}"
    continue
  fi
  mkdir -p "$OUT"
  echo "converting $src -> $out"
  if "${cmd[@]}"; then converted=$((converted + 1)); else failed=$((failed + 1)); fi
done <<<"$TABLE"

echo "converted $converted, failed $failed"
[[ $failed -eq 0 ]]
