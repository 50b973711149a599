#!/usr/bin/env bash
# The GPU session's runs on the lent H200, one step per device call (calls back to back: the machine
# goes back after 30 s idle). Here first: `bash ../shared/gpu/bundle.sh` (vLLM in chunks .gpu/c01..)
# and the extra wheels our code imports that the image lacks, into .gpu/extra (see bench/gpu_wheels.sh).
#   run(carry=[".gpu/c01", ".gpu/device-setup.sh"], command="bash .gpu/device-setup.sh")
#   run(carry=[".gpu/c02", ".gpu/device-setup.sh"], command="bash .gpu/device-setup.sh")
#   run(carry=[".gpu/c03", ".gpu/SHA256SUMS", ".gpu/device-setup.sh", ".gpu/extra"], command="bash bench/gpu_run.sh setup tests")
#   run(command="bash bench/gpu_run.sh bench06")      # perf_overhead_gpu.json + weight_push_gpu.json (0.6B)
#   run(command="bash bench/gpu_run.sh bench8b")      # weight_push_gpu.json gains the 8B rows
# Every step leaves its logs and result files under $OUT (they come back with the call).
set -uo pipefail
OUT=${OUT:-/tmp/fw-out}; mkdir -p "$OUT" /tmp/fw-results
export FLYWHEEL_HOME=/tmp/fwhome

step_setup() {
  bash .gpu/device-setup.sh || return 1
  python3 -m pip install -q --no-deps --target /tmp/fw-gpu/extra .gpu/extra/*.whl 2>&1 | tail -2
  cat > /tmp/fw-gpu/fw.sh <<EOF
. /tmp/fw-gpu/env.sh
export PYTHONPATH=$PWD:/tmp/fw-gpu/site:/tmp/fw-gpu/extra FLYWHEEL_HOME=/tmp/fwhome
EOF
  . /tmp/fw-gpu/fw.sh
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
  python3 -c "import vllm, torch, transformers, httpx, redis, rich, msgpack, pytest; print('imports ok', vllm.__version__, torch.__version__, transformers.__version__)"
  python3 -c "from server.models import resolve_model; print(resolve_model('tiny-qwen3'))"
}

step_tests() {
  . /tmp/fw-gpu/fw.sh
  timeout 560 python3 -m pytest -q -m gpu -p no:cacheprovider -o addopts="" tests/test_gpu_serve.py tests/test_weights_gpu_ipc.py \
    -x 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
  for f in $(ls -d /tmp/pytest-of-*/pytest-*/*/server.log 2>/dev/null | tail -4); do
    cp "$f" "$OUT/$(echo "$f" | tr '/' '_')"; done
}

step_bench06() {
  . /tmp/fw-gpu/fw.sh
  timeout 580 python3 bench/gpu_serving.py --shape qwen3-0.6b --work /tmp/gs06 --results /tmp/fw-results 2>&1 | tee "$OUT/bench06.log" | grep -v "^INFO\|^(APIServer\|^(EngineCore" | tail -40
  cp /tmp/fw-results/*.json "$OUT/" 2>/dev/null
  for s in flywheel bare; do tail -150 /tmp/gs06/$s/server.log > "$OUT/gs06_${s}_server.log" 2>/dev/null; done
}

step_bench8b() {
  . /tmp/fw-gpu/fw.sh
  timeout 580 python3 bench/gpu_serving.py --shape qwen3-8b --no-perf --gpu-memory-utilization 0.3 --work /tmp/gs8b \
    --results /tmp/fw-results 2>&1 | tee "$OUT/bench8b.log" | grep -v "^INFO\|^(APIServer\|^(EngineCore" | tail -40
  cp /tmp/fw-results/*.json "$OUT/" 2>/dev/null
  for s in flywheel bare; do tail -150 /tmp/gs8b/$s/server.log > "$OUT/gs8b_${s}_server.log" 2>/dev/null; done
}

for step in "$@"; do
  echo "==== $step $(date +%T)"
  "step_$step"
done
