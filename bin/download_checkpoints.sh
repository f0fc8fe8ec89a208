#!/usr/bin/env bash
# Downloads the published checkpoints of the encoders of "Evaluating Contrastive Models for
# Instance-based Image Retrieval" (Krishna et al., ICMR 2021), from their authors' releases:
# torchvision (pytorch/vision), MoCo (facebookresearch/moco), SimCLR (google-research/simclr),
# AMDIM (Philip-Bachman/amdim-public) and AP-GeM (naver/deep-image-retrieval).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bin/download_checkpoints.sh [--dir DIR] [--only NAME[,NAME...]] [--dry-run]
                                   [--simclr-converter PATH] [-h|--help]

Downloads the published PyTorch checkpoints into DIR (default: checkpoints/). Idempotent: a file
that is already there (and matches its published checksum prefix, where one is known) is
skipped; downloads go to a temporary name and are renamed when complete and verified.

  --dir DIR                 where the checkpoints go (default: checkpoints)
  --only NAMES              comma-separated subset of the names below (default: all)
  --dry-run                 print what would be fetched/run, fetch nothing
  --simclr-converter PATH   a clone of https://github.com/tonylins/simclr-converter; when
                            given (and TensorFlow is importable), the SimCLR TF checkpoints are
                            converted to resnet50-{1x,2x,4x}.pth with it (see below)
  -h, --help                this text

Names and files (checksum: sha256 prefix for torchvision, md5 prefix for MoCo):
  resnet50      resnet50-0676ba61.pth                      torchvision IMAGENET1K_V1 (baseline)
  resnet101     resnet101-63fe2227.pth                     torchvision IMAGENET1K_V1
  (both file names as torchvision 0.13 and later publish them: ResNet50_Weights and
  ResNet101_Weights.IMAGENET1K_V1, the original ImageNet weights; older releases named them
  resnet50-19c8e357.pth and resnet101-5d3b4d8f.pth)
  mocov1        moco_v1_200ep_pretrain.pth.tar             MoCo v1, 200 epochs (md5 b251726a)
  mocov2        moco_v2_200ep_pretrain.pth.tar             MoCo v2, 200 epochs (md5 59fd9945)
  mocov2_800ep  moco_v2_800ep_pretrain.pth.tar             MoCo v2, 800 epochs (md5 a04e12f8)
  simclr1x/2x/4x  ResNet50_{1x,2x,4x}.zip -> resnet50-{1x,2x,4x}.pth  SimCLR v1 (TF, converted)
  amdim         amdim_ndf256_rkhs2048_rd10.pth             AMDIM Medium (the paper's)
  amdim_large   amdim_ndf320_rkhs2560_rd10.pth             AMDIM Large
  apgem         Resnet-101-AP-GeM.pt (Google Drive zip)    dirtorch AP-GeM (upper bound)

SimCLR: google-research/simclr publishes only TensorFlow checkpoints (gs://simclr-gcs). They
must be converted to PyTorch once, with tonylins/simclr-converter (needs TensorFlow 1.x/2.x with
tf.compat.v1 and PyTorch; not a dependency of this project):
  1. git clone https://github.com/tonylins/simclr-converter
  2. this script downloads and unzips ResNet50_1x.zip etc. into DIR/simclr_tf/
  3. for w in 1x 2x 4x; do
       python simclr-converter/convert.py DIR/simclr_tf/ResNet50_$w/model.ckpt-225206 \
         DIR/resnet50-$w.pth
     done
     (step 3 is run by this script when --simclr-converter is given)
  The result is {'state_dict': ...} in torchvision names; its fc.bias is random (converter bug),
  which does not matter: the encoder drops fc. Then run bin/convert_checkpoints.sh.

AP-GeM (naver/deep-image-retrieval's README): the Drive file is a zip holding
Resnet-101-AP-GeM.pt (the README says Resnet101-AP-GeM.pt; the file has the hyphen). `gdown` is
used when installed, as `gdown https://drive.google.com/uc?id=ID -O FILE` (the form old and
current gdown releases all accept; current ones reject `--id`), else curl on
drive.usercontent.google.com.
EOF
}

DIR=checkpoints
ONLY=""
DRY=0
SIMCLR_CONVERTER=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir) DIR="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --simclr-converter) SIMCLR_CONVERTER="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "download_checkpoints.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

TV=https://download.pytorch.org/models
MOCO=https://dl.fbaipublicfiles.com/moco/moco_checkpoints
SIMCLR=https://storage.googleapis.com/simclr-gcs/checkpoints
AMDIM=https://amdimmodels.blob.core.windows.net/amdim
APGEM_DRIVE_ID=1UWJGDuHtzaQdFhSMojoYVQjmCXhIwVvy

# name | file | url | checksum kind (sha256/md5/-) | checksum prefix
TABLE="
resnet50|resnet50-0676ba61.pth|$TV/resnet50-0676ba61.pth|sha256|0676ba61
resnet101|resnet101-63fe2227.pth|$TV/resnet101-63fe2227.pth|sha256|63fe2227
mocov1|moco_v1_200ep_pretrain.pth.tar|$MOCO/moco_v1_200ep/moco_v1_200ep_pretrain.pth.tar|md5|b251726a
mocov2|moco_v2_200ep_pretrain.pth.tar|$MOCO/moco_v2_200ep/moco_v2_200ep_pretrain.pth.tar|md5|59fd9945
mocov2_800ep|moco_v2_800ep_pretrain.pth.tar|$MOCO/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar|md5|a04e12f8
simclr1x|simclr_tf/ResNet50_1x.zip|$SIMCLR/ResNet50_1x.zip|-|
simclr2x|simclr_tf/ResNet50_2x.zip|$SIMCLR/ResNet50_2x.zip|-|
simclr4x|simclr_tf/ResNet50_4x.zip|$SIMCLR/ResNet50_4x.zip|-|
amdim|amdim_ndf256_rkhs2048_rd10.pth|$AMDIM/amdim_ndf256_rkhs2048_rd10.pth|-|
amdim_large|amdim_ndf320_rkhs2560_rd10.pth|$AMDIM/amdim_ndf320_rkhs2560_rd10.pth|-|
apgem|apgem/Resnet-101-AP-GeM.zip|gdrive:$APGEM_DRIVE_ID|-|
"

wanted() {
  [[ -z "$ONLY" ]] && return 0
  [[ ",$ONLY," == *",$1,"* ]]
}

run() {
  if [[ $DRY -eq 1 ]]; then echo "would run: $*"; else "$@"; fi
}

verify() {  # file kind prefix -> 0 if the checksum prefix matches (or none is known)
  local file=$1 kind=$2 prefix=$3 sum
  [[ "$kind" == "-" || -z "$prefix" ]] && return 0
  if [[ "$kind" == sha256 ]]; then sum=$(sha256sum "$file" | cut -c1-${#prefix})
  else sum=$(md5sum "$file" | cut -c1-${#prefix}); fi
  [[ "$sum" == "$prefix" ]]
}

fetch() {  # url dest
  local url=$1 dest=$2 tmp="$2.part"
  if [[ "$url" == gdrive:* ]]; then
    local id=${url#gdrive:}
    if command -v gdown >/dev/null 2>&1; then
      run gdown "https://drive.google.com/uc?id=$id" -O "$tmp"
    else
      run curl -fL --retry 3 -o "$tmp" \
        "https://drive.usercontent.google.com/download?id=$id&export=download&confirm=t"
    fi
  else
    run curl -fL --retry 3 -C - -o "$tmp" "$url"
  fi
  run mv "$tmp" "$dest"
}

for n in ${ONLY//,/ }; do
  grep -q "^$n|" <<<"$TABLE" || { echo "unknown name '$n' (see -h)" >&2; exit 2; }
done

while IFS='|' read -r name file url kind prefix; do
  [[ -z "$name" ]] && continue
  wanted "$name" || continue
  dest="$DIR/$file"
  if [[ -f "$dest" ]]; then
    if verify "$dest" "$kind" "$prefix"; then
      echo "skip $name: $dest exists"
    else
      echo "error: $dest exists but its $kind does not start with $prefix; delete it" >&2
      exit 1
    fi
  else
    echo "fetch $name: $url -> $dest"
    run mkdir -p "$(dirname "$dest")"
    fetch "$url" "$dest"
    if [[ $DRY -eq 0 ]] && ! verify "$dest" "$kind" "$prefix"; then
      mv "$dest" "$dest.bad"
      echo "error: $dest: $kind does not start with $prefix (kept as $dest.bad)" >&2
      exit 1
    fi
  fi
  case "$name" in
    simclr*)
      w=${name#simclr}
      ckpt="$DIR/simclr_tf/ResNet50_$w/model.ckpt-225206"
      pth="$DIR/resnet50-$w.pth"
      if [[ ! -e "$ckpt.index" ]]; then run unzip -q -o "$dest" -d "$DIR/simclr_tf"; fi
      if [[ -f "$pth" ]]; then
        echo "skip simclr$w conversion: $pth exists"
      elif [[ -n "$SIMCLR_CONVERTER" ]]; then
        run python "$SIMCLR_CONVERTER/convert.py" "$ckpt" "$pth"
      else
        echo "todo: python simclr-converter/convert.py $ckpt $pth   (see -h)"
      fi
      ;;
    apgem)
      pt="$DIR/Resnet-101-AP-GeM.pt"
      if [[ -f "$pt" ]]; then echo "skip apgem unzip: $pt exists"
      else run unzip -q -o -j "$dest" '*.pt' -d "$DIR"; fi
      ;;
  esac
done <<<"$TABLE"
