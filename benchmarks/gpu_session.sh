#!/usr/bin/env bash
# One prepared GPU session (a lent H100/H200 with limited minutes): correctness first, then figures.
#   OUT=/some/folder bash benchmarks/gpu_session.sh
# Needs hydra-core / omegaconf importable (PYTHONPATH may point to a folder holding them).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-bench_out/gpu}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 60 python benchmarks/gpu_equivalence.py
common=(batch_size=128 img_size=224 'mask_ratios=[0.6]' device=cuda warmup=3 repeats=8)
timeout 170 python -m sparse_mim bench "${common[@]}" 'models=[resnet50,convnext_base,convnext_small]' \
    dtype=bfloat16 'what=[encoder,step]' output_dir="$OUT/bf16" 2>&1 | grep -v "^\s*$"
timeout 70 python -m sparse_mim bench "${common[@]}" 'models=[convnext_small,resnet50]' dtype=float32 \
    'what=[encoder,step]' memory=false output_dir="$OUT/fp32" 2>&1 | grep -v "^\s*$"
timeout 45 python -m sparse_mim bench "${common[@]}" 'models=[resnet50,convnext_base]' dtype=bfloat16 \
    execution=tiles 'what=[encoder]' memory=false output_dir="$OUT/bf16_tiles" 2>&1 | grep "|"
timeout 30 python benchmarks/dense_floor.py --model resnet50 --batch 128 --dtype bfloat16
