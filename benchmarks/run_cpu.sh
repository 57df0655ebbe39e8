#!/usr/bin/env bash
# The CPU target: ResNet-50, batch 8, 224 px, mask 0.6, float32, 2 threads; sparse vs masked-dense.
# Takes several minutes on a 2-core machine. Extra key=value arguments override (e.g. repeats=10).
#   PYTHON=/path/to/python OUTPUT_DIR=bench_out/cpu benchmarks/run_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 PYTHONUNBUFFERED=1
"${PYTHON:-python}" -m sparse_mim bench \
    'models=[resnet50]' 'mask_ratios=[0.6]' batch_size=8 img_size=224 dtype=float32 threads=2 device=cpu \
    warmup=2 repeats=5 'what=[encoder,step]' output_dir="${OUTPUT_DIR:-bench_out/cpu}" "$@"
