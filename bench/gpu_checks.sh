#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go, on any CUDA host where mergecli is installed
# (`pip install -e '.[test]'` with a CUDA build of torch) or importable from ./src.
#   bash bench/gpu_checks.sh            PYTHON=.venv/bin/python bash bench/gpu_checks.sh
# Logs go to $OUT (default gpu-out/). On a host without a package index, WHEELS=DIR installs the
# wheels in DIR (mergecli's dependencies other than torch) into $OUT/site first.
set -uo pipefail
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$OUT/site" "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$PWD/$OUT/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 COLUMNS=200
if ! "$PYTHON" -c "import torch, mergecli; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "error: $PYTHON cannot import torch and mergecli with a CUDA GPU visible; install the" \
    "project with a CUDA build of torch, or set PYTHON" >&2
  exit 1
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total \
  --format=csv,noheader
"$PYTHON" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
# pytest-xdist, where installed, spreads the suite over the host's cores.
PARALLEL=()
cores=$(nproc)
[ "$cores" -gt 8 ] && cores=8
"$PYTHON" -c "import xdist" 2>/dev/null && PARALLEL=(-n "$cores")

echo "== GPU tests, and the transformers load test (skipped without transformers)"
"$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu/test_gpu.py tests/e2e/test_transformers.py \
  2>&1 | tee "$OUT/gpu-tests.log" | tail -5
echo "== weight matching: LAP against everything else"
for width in 1 4 8; do "$PYTHON" bench/weight_matching.py --width "$width" --device cuda; done \
  2>&1 | tee "$OUT/weight-matching.log"
echo "== the same on this host's CPU cores (no host-to-device copy), for comparison"
"$PYTHON" bench/weight_matching.py --width 4 --device cpu 2>&1 | tee -a "$OUT/weight-matching.log"
echo "== NP Merge fit step against a plain training step"
"$PYTHON" bench/fit_step.py 2>&1 | tee "$OUT/fit-step.log"
if [ -f runs/mlp8-seed0.safetensors ] && [ -f runs/mlp8-seed1.safetensors ]; then
  echo "== the analysis example on the GPU (device: auto)"
  "$PYTHON" -m mergecli --log plain run configs/examples/mnist-analysis.yaml --overwrite 2>&1 \
    | tee "$OUT/analysis.log" | tail -25
  echo "== NP Merge under torchrun, one process on the GPU (nccl)"
  MERGECLI_LOG=plain timeout 120 "$PYTHON" -m torch.distributed.run --standalone \
    --nproc-per-node 1 -m mergecli run configs/examples/mnist-mlp8-np-merge.yaml \
    --set output.dir=out/torchrun-gpu --overwrite 2>&1 | tee "$OUT/torchrun.log" | tail -14
else
  echo "== (the example recipes need runs/mlp8-seed{0,1}.safetensors: \`make demo\` trains them)"
fi
echo "== whole suite with the GPU visible (device: auto picks it)"
timeout "${SUITE_TIMEOUT:-900}" "$PYTHON" -m pytest -q "${PARALLEL[@]}" -p no:cacheprovider tests \
  2>&1 | tee "$OUT/suite.log" | tail -15
