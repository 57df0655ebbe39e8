#!/usr/bin/env bash
# One prepared GPU session (a lent H100/H200 with limited minutes): correctness first, then figures.
#   OUT=/some/folder bash benchmarks/gpu_session.sh                 # every step
#   STEPS="graphcheck sweep graph fp32" OUT=... bash benchmarks/gpu_session.sh
# Steps: equivalence (eager rules + CUDA graph, fp32), graphcheck (CUDA graph only), sweep (execution
# rules + CUDA graph, side by side), bf16 (bench, eager), graph (bench, CUDA graph), fp32, floor,
# scale (the GPU-decode test, then 50 pretraining steps eager vs train.cuda_graph=true vs the
# graph under torchrun --nproc_per_node 1; STEPS="scale" runs only that, ~4 min), fcmae (ConvNeXt V2's
# FCMAE encoder and step, sparse vs masked-dense, bf16 then float32, ConvNeXt V2-Tiny and -Base, ~3 min),
# twins (each hand-tuned twin against sparsify of the same timm model, encoder bf16 batch 128, interleaved,
# with peak memory; a twin no faster here nor on CPU can go, ~4 min; STEPS="twins" runs only that).
# Needs hydra-core / omegaconf importable (PYTHONPATH may point to a folder holding them).
# Every step has its own time limit and writes into $OUT as it goes, so a cut-off run still reports.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-bench_out/gpu}"
STEPS=" ${STEPS:-equivalence sweep bf16 graph fp32 floor fcmae} "
mkdir -p "$OUT"
want() { [[ "$STEPS" == *" $1 "* ]]; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

bench() {  # bench NAME TIMEOUT overrides...: full log in $OUT/NAME.log, tables on stdout
    local name=$1 limit=$2; shift 2
    timeout "$limit" python -m sparse_mim bench "$@" output_dir="$OUT/$name" > "$OUT/$name.log" 2>&1
    echo "-- $name (exit $?)"; grep "|" "$OUT/$name/results.md" 2>/dev/null || tail -5 "$OUT/$name.log"
}

if want equivalence; then
    echo "== equivalence (float32, no TF32)"
    timeout 120 python benchmarks/gpu_equivalence.py 2>&1 | tee "$OUT/equivalence.txt"
elif want graphcheck; then
    echo "== CUDA graph equivalence (float32, no TF32)"
    timeout 80 python benchmarks/gpu_equivalence.py --graph-only 2>&1 | tee "$OUT/graphcheck.txt"
fi
if want sweep; then
    echo "== execution-rule sweep (bf16, batch 128, mask 0.6)"
    timeout 150 python benchmarks/gpu_sweep.py --warmup 2 --repeats 6 --out "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.txt"
fi
graph_ok=$(python -c "import json,sys; r=json.load(open(sys.argv[1])); print(int(all(not v['failed'] for v in r.values())))" \
    "$OUT/sweep.json" 2>/dev/null || echo 0)

common=(batch_size=128 img_size=224 device=cuda warmup=3 repeats=8 'what=[encoder,step]' dtype=bfloat16)
if want bf16; then
    echo "== bench, bf16, eager"
    bench bf16_resnet50 100 "${common[@]}" 'models=[resnet50]' 'mask_ratios=[0.6,0.75,0.9]'
    bench bf16_convnext_base 100 "${common[@]}" 'models=[convnext_base]' 'mask_ratios=[0.6,0.75,0.9]'
    bench bf16_convnext_small 50 "${common[@]}" 'models=[convnext_small]' 'mask_ratios=[0.6]'
fi
if want graph && [ "$graph_ok" = 1 ]; then
    echo "== bench, bf16, CUDA graph"
    bench graph_resnet50 80 "${common[@]}" cuda_graph=true 'models=[resnet50]' 'mask_ratios=[0.6,0.9]'
    bench graph_convnext_base 80 "${common[@]}" cuda_graph=true 'models=[convnext_base]' 'mask_ratios=[0.6,0.9]'
fi
if want fp32; then
    echo "== bench, float32 (the official float32 figures)"
    fp32=(batch_size=128 img_size=224 device=cuda warmup=2 repeats=4 'mask_ratios=[0.6]' dtype=float32 memory=false)
    bench fp32_convnext_small 70 "${fp32[@]}" 'what=[step]' 'models=[convnext_small]'
    [ "$graph_ok" = 1 ] && bench fp32_graph_convnext_small 70 "${fp32[@]}" 'what=[step]' cuda_graph=true 'models=[convnext_small]'
    bench fp32_resnet50 60 "${fp32[@]}" 'what=[encoder,step]' 'models=[resnet50]'
fi
if want floor; then
    echo "== plain dense timm ResNet-50"
    timeout 30 python benchmarks/dense_floor.py --model resnet50 --batch 128 --dtype bfloat16
fi
if want fcmae; then
    echo "== bench method=fcmae (ConvNeXt V2 FCMAE: sparse vs masked-dense encoder and step)"
    bench fcmae_bf16 120 "${common[@]}" method=fcmae 'models=[convnextv2_tiny,convnextv2_base]' 'mask_ratios=[0.6,0.75]'
    bench fcmae_fp32 60 batch_size=64 img_size=224 device=cuda warmup=2 repeats=4 dtype=float32 memory=false \
        'what=[encoder,step]' method=fcmae 'models=[convnextv2_tiny]' 'mask_ratios=[0.6]'
fi
if want twins; then
    echo "== hand-tuned twins vs sparsify (encoder fwd+bwd, bf16, batch 128, 224 px, mask 0.6; ratio sparsify/twin)"
    timeout 300 python benchmarks/twin_vs_sparsify.py --device cuda --bf16 --threads 0 --batch-size 128 --warmup 3 \
        --repeats 10 --models resnet18 resnet50 resnet101 convnext_tiny convnext_base convnextv2_tiny \
        --csv "$OUT/twins.csv" 2>&1 | tee "$OUT/twins.txt"
fi
if want scale; then
    echo "== data.decode=gpu: CUDA crops vs CPU crops"
    timeout 120 python -m pytest -q -p no:cacheprovider tests/test_tensor_decode.py 2>&1 | tee "$OUT/gpu_decode.txt" | tail -3
    echo "== pretraining: eager vs CUDA graph vs CUDA graph under torchrun (resnet50, bf16, batch 128, 224 px)"
    timeout 420 python benchmarks/graph_vs_eager.py "$OUT/scale" --limit 130 2>&1 | tee "$OUT/scale.txt"
fi
