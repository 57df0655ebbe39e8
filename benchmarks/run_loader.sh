#!/usr/bin/env bash
# Input-pipeline throughput (sparse-mim bench what=loader) on imagenette-128 and on 224-px JPEG
# re-encodes of it made on the fly in a temporary folder (the first 100 images of each class,
# upscaled to a 224-px short side, JPEG quality 90).
# Usage: benchmarks/run_loader.sh DATA [OUT] [bench overrides, e.g. repeats=5 loader_workers=[0,1,2]]
#   DATA: a folder of Imagenette-128 images (its train/ split)
set -euo pipefail
DATA=${1:?usage: benchmarks/run_loader.sh DATA [OUT] [overrides]: DATA is a folder of Imagenette-128 images}
OUT=${2:-bench_out/loader}
shift $(( $# < 2 ? $# : 2 ))
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
uptime
python - "$DATA" "$TMP/train" <<'PY'
import sys
from pathlib import Path
from PIL import Image
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for folder in sorted(p for p in src.iterdir() if p.is_dir()):
    (dst / folder.name).mkdir(parents=True)
    for f in sorted(folder.iterdir())[:100]:
        with Image.open(f) as im:
            im = im.convert("RGB")
            s = 224 / min(im.size)
            im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC).save(dst / folder.name / f.name, quality=90)
PY
for size_data in "128:$DATA" "224:$TMP/train"; do
  size=${size_data%%:*}; data=${size_data#*:}
  nice -n 10 python -m sparse_mim bench what=loader data_path="$data" img_size=$size batch_size=32 \
      "loader_workers=[0,1,2]" loader_batches=8 repeats=6 "$@" output_dir="$OUT/$size"
done
uptime
