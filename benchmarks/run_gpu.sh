#!/usr/bin/env bash
# The GPU setting of the results (one GPU): batch 128, 224 px, mask 0.6.
#   1. ResNet-50, ConvNeXt-B, ConvNeXt-S in bfloat16 autocast (encoder fwd+bwd and the full step);
#   2. ConvNeXt-S and ResNet-50 in float32, for the official SparK's float32 figures
#      (benchmarks/RESULTS.md; the official code cannot run ConvNeXt in bfloat16).
# Extra key=value arguments go to both runs (e.g. execution=implicit_gemm, repeats=20).
#   PYTHON=/path/to/python OUTPUT_DIR=bench_out benchmarks/run_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out="${OUTPUT_DIR:-bench_out}"
common=(batch_size=128 img_size=224 'mask_ratios=[0.6]' device=cuda warmup=5 repeats=20 'what=[encoder,step]')
"${PYTHON:-python}" -m sparse_mim bench "${common[@]}" 'models=[resnet50,convnext_base,convnext_small]' \
    dtype=bfloat16 output_dir="$out/gpu_bf16" "$@"
"${PYTHON:-python}" -m sparse_mim bench "${common[@]}" 'models=[convnext_small,resnet50]' \
    dtype=float32 output_dir="$out/gpu_fp32" "$@"
