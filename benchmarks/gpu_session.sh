#!/usr/bin/env bash
# One prepared GPU session (a lent H100/H200 with limited minutes): correctness first, then figures.
#   OUT=/some/folder bash benchmarks/gpu_session.sh
# Needs hydra-core / omegaconf importable (PYTHONPATH may point to a folder holding them).
# Every step has its own time limit and writes into $OUT as it goes, so a cut-off run still reports.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-bench_out/gpu}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
git log -1 --format='commit %h %s' 2>/dev/null || true

echo "== 1. equivalence (float32, no TF32)"
timeout 100 python benchmarks/gpu_equivalence.py 2>&1 | tee "$OUT/equivalence.txt"

echo "== 2. execution-rule sweep (bf16, batch 128, mask 0.6)"
timeout 150 python benchmarks/gpu_sweep.py --out "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.txt"
# The fastest rule of the sweep for a model family, as bench overrides (empty = the default rule).
best() {
    python - "$OUT/sweep.json" "$1" <<'PY'
import json, sys
try:
    opts = json.load(open(sys.argv[1]))[sys.argv[2]]["best_options"]
except Exception:
    sys.exit(0)
print(" ".join(f"{k}={v}" for k, v in opts.items() if k.startswith("execution")))
PY
}
r50=$(best resnet50); cnx=$(best convnext_base)
echo "rules used below: resnet50: ${r50:-default}; convnext: ${cnx:-default}"

echo "== 3. bench, bf16"
common=(batch_size=128 img_size=224 device=cuda warmup=3 repeats=8 'what=[encoder,step]')
timeout 100 python -m sparse_mim bench "${common[@]}" 'models=[resnet50]' 'mask_ratios=[0.6,0.75,0.9]' \
    dtype=bfloat16 $r50 output_dir="$OUT/bf16_resnet50" 2>&1 | grep -v "^\s*$" | grep -v "^\["
timeout 100 python -m sparse_mim bench "${common[@]}" 'models=[convnext_base]' 'mask_ratios=[0.6,0.75,0.9]' \
    dtype=bfloat16 $cnx output_dir="$OUT/bf16_convnext_base" 2>&1 | grep "|"
timeout 50 python -m sparse_mim bench "${common[@]}" 'models=[convnext_small]' 'mask_ratios=[0.6]' \
    dtype=bfloat16 $cnx output_dir="$OUT/bf16_convnext_small" 2>&1 | grep "|"

echo "== 4. bench, float32 (the reference's float32 figures)"
fp32=(batch_size=128 img_size=224 device=cuda warmup=2 repeats=5 'what=[encoder,step]' 'mask_ratios=[0.6]'
      dtype=float32 memory=false)
timeout 40 python -m sparse_mim bench "${fp32[@]}" 'models=[convnext_small]' $cnx output_dir="$OUT/fp32_convnext_small" \
    2>&1 | grep "|"
timeout 35 python -m sparse_mim bench "${fp32[@]}" 'models=[resnet50]' $r50 output_dir="$OUT/fp32_resnet50" 2>&1 | grep "|"

echo "== 5. plain dense timm ResNet-50"
timeout 30 python benchmarks/dense_floor.py --model resnet50 --batch 128 --dtype bfloat16
