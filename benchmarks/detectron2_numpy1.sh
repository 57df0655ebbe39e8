#!/usr/bin/env bash
# Detectron2 .pkl files load under numpy 1.x as well as numpy 2.x.
#
#   bash benchmarks/detectron2_numpy1.sh            # makes $NUMPY1_ENV (default /tmp/np126) if missing
#
# 1. a separate virtualenv with numpy 1.26.4 only (python3.11 -m venv; pip install numpy==1.26.4);
# 2. this project (numpy 2.x) converts a ResNet-50 encoder (timm's random init, a fixed seed) with
#    `sparse-mim convert --to detectron2`;
# 3. the numpy-1 Python unpickles the file and prints its numpy version, the tensor count and the
#    float64 sum of all values, which must equal the same sum computed under numpy 2.
# The test suite repeats step 3 on a small file whenever that environment exists
# (tests/test_convert.py::test_detectron2_pickle_loads_under_numpy_1, SPARSE_MIM_NUMPY1_PYTHON=...).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
NUMPY1_ENV=${NUMPY1_ENV:-/tmp/np126}
OUT=${OUTPUT_DIR:-bench_out/detectron2_numpy1}
mkdir -p "$OUT"

if [ ! -x "$NUMPY1_ENV/bin/python" ]; then
    python3.11 -m venv "$NUMPY1_ENV"
    "$NUMPY1_ENV/bin/pip" install -q numpy==1.26.4
fi

"$PYTHON" - "$OUT/r50_encoder.pth" <<'PY'
import sys, timm, torch
torch.manual_seed(0)
model = timm.create_model("resnet50", pretrained=False)
torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}, sys.argv[1])
PY
"$PYTHON" -m sparse_mim convert "$OUT/r50_encoder.pth" --to detectron2 --arch resnet50 --out "$OUT/r50_d2.pkl" \
    | head -1

SUM='import pickle, sys, numpy
m = pickle.load(open(sys.argv[1], "rb"))["model"]
print(f"numpy {numpy.__version__}: {len(m)} arrays, sum {sum(float(v.astype(numpy.float64).sum()) for v in m.values())!r}")'
A=$("$PYTHON" -c "$SUM" "$OUT/r50_d2.pkl")
B=$("$NUMPY1_ENV/bin/python" -c "$SUM" "$OUT/r50_d2.pkl")
echo "writer env: $A"
echo "numpy-1 env: $B"
[ "${A#*:}" = "${B#*:}" ] && echo "OK: identical contents under both numpy versions" || { echo "MISMATCH"; exit 1; }
