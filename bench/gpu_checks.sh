#!/usr/bin/env bash
# The checks that need a CUDA GPU, as one script for a lent GPU machine whose python3 already
# has torch (pydantic and its needs come as wheels in .whl/). Writes logs to $OUT (or ./gpu-out).
# Run: bash bench/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 COLUMNS=200
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"

echo "== GPU tests, and the transformers load test (transformers is installed there)"
python3 -m pytest -q tests/test_gpu.py tests/test_transformers.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -5
echo "== weight matching: LAP against everything else"
for width in 1 4 8; do python3 bench/weight_matching.py --width "$width" --device cuda; done \
  2>&1 | tee "$OUT/weight-matching.log"
echo "== the same on this host's CPU cores (no host-to-device copy), for comparison"
python3 bench/weight_matching.py --width 4 --device cpu 2>&1 | tee -a "$OUT/weight-matching.log"
echo "== NP Merge fit step against a plain training step"
python3 bench/fit_step.py 2>&1 | tee "$OUT/fit-step.log"
if [ -f runs/mlp8-seed0.safetensors ]; then
  echo "== the analysis example on the GPU (device: auto)"
  python3 -m mergecli --log plain run configs/examples/mnist-analysis.yaml 2>&1 \
    | tee "$OUT/analysis.log" | tail -25
fi
if [ -f runs/mlp8-seed0.safetensors ]; then
  echo "== NP Merge under torchrun, one process on the GPU (nccl)"
  MERGECLI_LOG=plain timeout 120 torchrun --standalone --nproc-per-node 1 -m mergecli run \
    configs/examples/mnist-mlp8-np-merge.yaml --set output.dir=out/torchrun-gpu 2>&1 \
    | tee "$OUT/torchrun.log" | tail -14
fi
echo "== whole suite with the GPU visible (device: auto picks it)"
timeout "${SUITE_TIMEOUT:-240}" python3 -m pytest -q -n 8 -p no:cacheprovider tests \
  2>&1 | tee "$OUT/suite.log" | tail -15
