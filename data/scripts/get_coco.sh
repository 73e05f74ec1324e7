#!/usr/bin/env bash
# Download COCO 2017 in YOLO layout into ../datasets/coco (relative to the repository root).
# Run it yourself, once:   bash data/scripts/get_coco.sh [--train] [--val] [--test]
# With no option it fetches the labels, val2017 and train2017 images (about 20 GB).
# Labels are YOLOv5's converted COCO labels (boxes); images come from cocodataset.org.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
target="${repo_root}/../datasets"
mkdir -p "${target}"
cd "${target}"

want_train=false want_val=false want_test=false
if [ $# -eq 0 ]; then want_train=true want_val=true; fi
for arg in "$@"; do
  case "${arg}" in
    --train) want_train=true ;;
    --val) want_val=true ;;
    --test) want_test=true ;;
    *) echo "usage: $0 [--train] [--val] [--test]" >&2; exit 2 ;;
  esac
done

fetch_and_unzip() {  # url, folder to unzip into
  local url="$1" dest="$2" file
  file="$(basename "${url}")"
  echo "Downloading ${url}"
  curl -fL --retry 3 -o "${file}" "${url}"
  unzip -q -o "${file}" -d "${dest}"
  rm -f "${file}"
}

# Labels (YOLO format) and the train2017.txt / val2017.txt image lists.
fetch_and_unzip https://github.com/ultralytics/assets/releases/download/v0.0.0/coco2017labels.zip .

images="https://images.cocodataset.org/zips"
if ${want_val}; then fetch_and_unzip "${images}/val2017.zip" coco/images; fi
if ${want_train}; then fetch_and_unzip "${images}/train2017.zip" coco/images; fi
if ${want_test}; then fetch_and_unzip "${images}/test2017.zip" coco/images; fi
echo "COCO is in ${target}/coco. Train with: python train.py --data coco.yaml"
