#!/usr/bin/env bash
# Downloads the retrieval benchmarks (images and ground truth) in the layout jretrieval.datasets
# reads. Idempotent and resumable; --dry-run prints what it would fetch.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bin/download_datasets.sh [--dir DIR] [--dry-run] [--keep-archives] [-h|--help] [DATASET...]

Downloads the published image archives and ground-truth files into DIR (default: data/ in the
repository, i.e. config.data.root) in the layout jretrieval.datasets reads:

  oxford5k     DIR/oxford5k/gnd_oxford5k.pkl, DIR/oxford5k/jpg/*.jpg      (5,063 images, 1.8 GB)
  paris6k      DIR/paris6k/gnd_paris6k.pkl, DIR/paris6k/jpg/*.jpg         (6,412 images, 2.4 GB)
  roxford5k    DIR/roxford5k/gnd_roxford5k.pkl (images: those of oxford5k, fetched if absent)
  rparis6k     DIR/rparis6k/gnd_rparis6k.pkl   (images: those of paris6k, fetched if absent)
  instre       DIR/instre/gnd_instre.mat, DIR/instre/INSTRE-*/...  (Iscen et al. 2017 split, 2.3 GB)
  revisitop1m  DIR/revisitop1m/revisitop1m.txt, DIR/revisitop1m/jpg/... (1M distractors, ~400 GB)

DATASET: any of the names above, or "all". Default: the paper's five datasets (everything but
revisitop1m, which is only fetched when named).

Sources:
  images       https://www.robots.ox.ac.uk/~vgg/data/{oxbuildings,parisbuildings}/ (the -v1
               archives). These are the face-blurred versions VGG published in 2022 in place
               of the originals; the paper (2021) used the originals, so figures may differ
               slightly from the paper's.
  classic gnd  http://cmp.felk.cvut.cz/cnnimageretrieval/data/test/<name>/gnd_<name>.pkl
  revisited    http://cmp.felk.cvut.cz/revisitop/data/datasets/<name>/gnd_<name>.pkl
  INSTRE       images: ftp://ftp.irisa.fr/local/texmex/corpus/instre/instre.tar.gz
               gnd: ftp://ftp.irisa.fr/local/texmex/corpus/diffusion/gnd/gnd_instre.mat (where
               Iscen et al.'s diffusion code fetches it), else .../corpus/instre/gnd_instre.mat
  R1M          http://ptak.felk.cvut.cz/revisitop/revisitop1m/ (revisitop1m.txt, jpg/*.tar.gz)

Idempotent: a file already present is skipped; an archive whose contents were extracted (a
DIR/<dataset>/.extracted-<archive> marker) is not fetched again. Downloads go to <file>.part
and resume from it (curl -C -, or wget -c) after an interruption; only a finished download is
renamed to its final name. Archives are fetched into DIR/.downloads/ and deleted once extracted
(--keep-archives keeps them). Needs curl or wget, and tar.

  --dir DIR         the data folder (default: <repository>/data)
  --dry-run         print what would be fetched and extracted; fetch nothing
  --keep-archives   keep the downloaded archives after extraction
  -h, --help        this text
EOF
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$REPO/data"
DRY=0
KEEP=0
DATASETS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dir)
      [[ $# -ge 2 ]] || { echo "download_datasets.sh: --dir needs a value" >&2; exit 2; }
      DIR="$2"; shift 2 ;;
    --dir=*) DIR="${1#--dir=}"; shift ;;
    --dry-run) DRY=1; shift ;;
    --keep-archives) KEEP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "download_datasets.sh: unknown option '$1'" >&2; usage >&2; exit 2 ;;
    *) DATASETS+=("$1"); shift ;;
  esac
done

KNOWN="oxford5k paris6k roxford5k rparis6k instre revisitop1m"
DEFAULT="oxford5k paris6k roxford5k rparis6k instre"
if [[ ${#DATASETS[@]} -eq 0 ]]; then
  read -r -a DATASETS <<<"$DEFAULT"
fi
SELECTED=()
for name in "${DATASETS[@]}"; do
  if [[ "$name" == all ]]; then
    read -r -a more <<<"$KNOWN"
    SELECTED+=("${more[@]}")
  elif [[ " $KNOWN " == *" $name "* ]]; then
    SELECTED+=("$name")
  else
    echo "download_datasets.sh: unknown dataset '$name'; expected one of: $KNOWN, all" >&2
    exit 2
  fi
done

VGG=https://www.robots.ox.ac.uk/~vgg/data
CIRTORCH_GND=http://cmp.felk.cvut.cz/cnnimageretrieval/data/test
REVISITOP_GND=http://cmp.felk.cvut.cz/revisitop/data/datasets
INSTRE_URL=ftp://ftp.irisa.fr/local/texmex/corpus/instre
INSTRE_GND_URL=ftp://ftp.irisa.fr/local/texmex/corpus/diffusion/gnd/gnd_instre.mat
R1M_URL=http://ptak.felk.cvut.cz/revisitop/revisitop1m
R1M_ARCHIVES=100

DOWNLOADER=""
if [[ $DRY -eq 0 ]]; then
  if command -v curl >/dev/null 2>&1; then
    DOWNLOADER=curl
  elif command -v wget >/dev/null 2>&1; then
    DOWNLOADER=wget
  else
    echo "download_datasets.sh: needs curl or wget" >&2
    exit 1
  fi
fi

# fetch URL DEST: downloads URL to DEST unless DEST exists (resuming DEST.part).
fetch() {
  local url="$1" dest="$2"
  if [[ -f "$dest" ]]; then
    echo "skip $dest (exists)"
    return 0
  fi
  local resume=""
  [[ -f "$dest.part" ]] && resume=" (resuming $dest.part)"
  if [[ $DRY -eq 1 ]]; then
    echo "fetch $url -> $dest$resume"
    return 0
  fi
  echo "fetch $url -> $dest$resume"
  mkdir -p "$(dirname "$dest")"
  if [[ $DOWNLOADER == curl ]]; then
    curl -fL --retry 5 --retry-delay 10 -C - -o "$dest.part" "$url" || return 1
  else
    wget -c --tries=5 -O "$dest.part" "$url" || return 1
  fi
  mv -f "$dest.part" "$dest"
}

# fetch_first DEST URL...: DEST from the first URL that serves it (sources of one file, in
# order of preference); a failed source's partial file is dropped before the next is tried.
fetch_first() {
  local dest="$1" url
  shift
  for url in "$@"; do
    if fetch "$url" "$dest"; then
      return 0
    fi
    echo "failed: $url${2:+ (trying the next source)}" >&2
    rm -f "$dest.part"
    shift
  done
  return 1
}

# archive URL DATASET_DIR TARGET_DIR MODE: fetches an archive and extracts it into TARGET_DIR,
# MODE "flatten" (every file moved directly into TARGET_DIR, as cirtorch does for Oxford/Paris)
# or "tree" (paths kept). A marker in DATASET_DIR records a finished extraction.
archive() {
  local url="$1" dataset_dir="$2" target="$3" mode="$4"
  local name
  name="$(basename "$url")"
  local marker="$dataset_dir/.extracted-$name"
  local file="$DIR/.downloads/$name"
  [[ -n "${PLANNED[$url]:-}" ]] && return 0  # already handled in this run
  PLANNED[$url]=1
  if [[ -f "$marker" ]]; then
    echo "skip $url (already extracted into $target)"
    return 0
  fi
  fetch "$url" "$file"
  echo "extract $file -> $target"
  [[ $DRY -eq 1 ]] && return 0
  mkdir -p "$target"
  if [[ "$mode" == flatten ]]; then
    local tmp="$target/.tmp-$name"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    tar -xzf "$file" -C "$tmp"
    find "$tmp" -type f -exec sh -c 'mv -f "$@" "$0"' "$target" {} +
    rm -rf "$tmp"
  else
    tar -xzf "$file" -C "$target"
    # an archive with a single top folder named like the target: move its contents up
    local inner
    inner="$target/$(basename "$target")"
    if [[ -d "$inner" && ! -e "$inner/$(basename "$target")" ]]; then
      find "$inner" -mindepth 1 -maxdepth 1 -exec sh -c 'mv -f "$@" "$0"' "$target" {} +
      rmdir "$inner" 2>/dev/null || true
    fi
  fi
  touch "$marker"
  if [[ $KEEP -eq 0 ]]; then
    rm -f "$file"
  fi
}

oxford_images() {
  archive "$VGG/oxbuildings/oxbuild_images-v1.tgz" "$DIR/oxford5k" "$DIR/oxford5k/jpg" flatten
}

paris_images() {
  local part
  for part in 1 2; do
    archive "$VGG/parisbuildings/paris_$part-v1.tgz" "$DIR/paris6k" "$DIR/paris6k/jpg" flatten
  done
}

download() {
  local name="$1"
  echo "== $name"
  case "$name" in
    oxford5k)
      fetch "$CIRTORCH_GND/oxford5k/gnd_oxford5k.pkl" "$DIR/oxford5k/gnd_oxford5k.pkl"
      oxford_images ;;
    paris6k)
      fetch "$CIRTORCH_GND/paris6k/gnd_paris6k.pkl" "$DIR/paris6k/gnd_paris6k.pkl"
      paris_images ;;
    roxford5k)
      fetch "$REVISITOP_GND/roxford5k/gnd_roxford5k.pkl" "$DIR/roxford5k/gnd_roxford5k.pkl"
      oxford_images ;;
    rparis6k)
      fetch "$REVISITOP_GND/rparis6k/gnd_rparis6k.pkl" "$DIR/rparis6k/gnd_rparis6k.pkl"
      paris_images ;;
    instre)
      fetch_first "$DIR/instre/gnd_instre.mat" "$INSTRE_GND_URL" "$INSTRE_URL/gnd_instre.mat"
      archive "$INSTRE_URL/instre.tar.gz" "$DIR/instre" "$DIR/instre" tree ;;
    revisitop1m)
      fetch "$R1M_URL/revisitop1m.txt" "$DIR/revisitop1m/revisitop1m.txt"
      local i
      for ((i = 1; i <= R1M_ARCHIVES; i++)); do
        archive "$R1M_URL/jpg/revisitop1m.$i.tar.gz" "$DIR/revisitop1m" "$DIR/revisitop1m/jpg" tree
      done ;;
  esac
}

[[ $DRY -eq 1 ]] && echo "dry run: nothing is downloaded (data folder: $DIR)"
declare -A DONE=()
declare -A PLANNED=()
for name in "${SELECTED[@]}"; do
  [[ -n "${DONE[$name]:-}" ]] && continue
  DONE[$name]=1
  download "$name"
done
if [[ $DRY -eq 0 ]]; then
  echo "done: ${!DONE[*]} in $DIR"
fi
