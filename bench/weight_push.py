"""Benchmark: a full weight push into a live server, per transport, against the bounds measured in the same run.

For each model: start `flywheel serve` (with vLLM's dev routes, for the reload baseline), then
  memcpy   : copying the same tensors once in this process (torch clone) -- the bandwidth bound;
  reload   : vLLM's own `reload_weights` from a safetensors folder (POST /collective_rpc) -- the baseline;
  shm/http : push_weights(state_dict, transport=...) end to end (serialize, transfer, validate, pause,
             apply, prefix-cache reset, resume), median of --repeats.
Writes bench/results/weight_push.json (flat keys; ratios are A_vs_B_ratio = seconds_A / seconds_B).

    python bench/weight_push.py [--models tiny-qwen3 tiny-qwen3-moe smollm2-135m-instruct] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.models import resolve_model  # noqa: E402
from server.weights.client import push_weights  # noqa: E402
from tests.servers import start_server  # noqa: E402


def fp32_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        sd.update({k: v.float() for k, v in load_file(f).items()})
    return sd


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(name: str, repeats: int, workdir: Path) -> dict:
    model_dir = resolve_model(name)
    sd = fp32_state_dict(model_dir)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    memcpy = median_seconds(lambda: [t.clone() for t in sd.values()], repeats)
    out = {f"{name}_bytes": nbytes, f"{name}_memcpy_s": round(memcpy, 4)}
    with start_server(model_dir, workdir / name, served_model_name="m", dev_routes=True) as srv:
        def reload():
            r = httpx.post(srv.url + "/collective_rpc", headers=srv.admin_headers, timeout=600,
                           json={"method": "reload_weights", "kwargs": {"weights_path": str(model_dir)}})
            r.raise_for_status()

        reload()  # warm-up
        out[f"{name}_reload_s"] = round(median_seconds(reload, repeats), 4)
        version = [0]

        def push(transport):
            version[0] += 1
            push_weights(srv.url, sd, version[0], srv.admin_token, transport=transport)

        for transport in ("shm", "http"):
            push(transport)  # warm-up (first push reads the served manifest)
            seconds = median_seconds(lambda: push(transport), repeats)
            out[f"{name}_{transport}_push_s"] = round(seconds, 4)
            out[f"{name}_{transport}_push_GBps"] = round(nbytes / seconds / 1e9, 3)
            out[f"{name}_{transport}_push_vs_memcpy_ratio"] = round(seconds / memcpy, 3)
            out[f"{name}_{transport}_push_vs_reload_ratio"] = round(seconds / out[f"{name}_reload_s"], 3)
        check = httpx.post(srv.base_url + "/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2}, timeout=60)
        out[f"{name}_serves_after_pushes"] = check.status_code == 200
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny-qwen3", "tiny-qwen3-moe", "smollm2-135m-instruct"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "weight_push.json")
    args = ap.parse_args()
    import vllm

    results: dict = {"command": "python " + " ".join(sys.argv), "machine": f"{platform.node()} {platform.machine()} "
                     f"{torch.get_num_threads()} threads", "python": platform.python_version(),
                     "torch": torch.__version__, "vllm": vllm.__version__, "repeats": args.repeats}
    with tempfile.TemporaryDirectory(prefix="fwbench-") as tmp:
        for name in args.models:
            results.update(bench_model(name, args.repeats, Path(tmp)))
            print(json.dumps({k: v for k, v in results.items() if k.startswith(name)}, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    for k, v in results.items():
        if k.endswith("_ratio"):
            print(f"{k:55s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
