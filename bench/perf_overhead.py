"""Flywheel's serving overhead vs bare vLLM, and our load tool vs vLLM's own serving benchmark (issue 6).

One run, one server at a time (never both at once: 2 cores):
  1. `flywheel serve` on the model; our perf tool's closed-loop load and vLLM's serving benchmark
     (vllm.benchmarks.serve, in a child Python) on the same server with the same load, alternating,
     `reps` times each.
  2. a bare vLLM server (`python -m vllm.entrypoints.launchers.api_server.entry`) with the same
     engine flags as `flywheel serve` builds (server.serve.vllm_argv) minus Flywheel's worker
     extension; our perf tool's load again, `reps` times.
Each number is the median over the repetitions, and the two servers' measurements alternate in
time as little as the one-server rule allows, so treat ratios within a few percent as noise on a
shared machine.

Ratios (goals from the issue):
  flywheel_vs_vllm_output_throughput_ratio   >= 0.97
  flywheel_vs_vllm_ttft_p50_ratio            <= 1.03
  ours_vs_vllm_bench_output_throughput_ratio  within 0.97 .. 1.03

  python bench/perf_overhead.py                       # tiny-qwen3, parallel 16, 128 in / 64 out
  python bench/perf_overhead.py --model smollm2-135m-instruct --parallel 8 --num-requests 32
Writes bench/results/perf_overhead.json (flat keys).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("FLYWHEEL_HOME", str(REPO / ".flywheel"))

VLLM_BENCH = (
    "import sys\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))\n"
)


@contextmanager
def start_bare_vllm(model_path: Path, workdir: Path, weight_transfer: dict | None = None, **overrides):
    """A bare vLLM OpenAI server with the engine flags `flywheel serve` would use for the same
    settings as clients.servers.start_server (without Flywheel's worker extension and weight-transfer
    backend), under the same one-server lock. `weight_transfer` (e.g. {"backend": "ipc"}) gives it
    vLLM's own weight-transfer engine and RL routes instead (dev mode), as a baseline for pushes."""
    from flywheel.clients.servers import launch
    from flywheel.server.config import ServeConfig
    from flywheel.server.net import free_port
    from flywheel.server.serve import engine_environment, on_cpu, vllm_argv

    workdir.mkdir(parents=True, exist_ok=True)
    settings = {
        "port": free_port(),
        "data_dir": workdir / "data",
        "kv_cache_gib": 1,
        "max_model_len": 1024,
        "max_num_seqs": 32,
        **overrides,
    }
    config = ServeConfig(model=str(model_path), **settings)
    cpu = on_cpu()
    name = config.served_model_name or model_path.name
    argv = vllm_argv(config, model_path, name, cpu)
    for flag in ("--worker-extension-cls", "--weight-transfer-config"):  # Flywheel's own additions
        i = argv.index(flag)
        del argv[i : i + 2]
    env = {**os.environ, **engine_environment(config, cpu)}
    if weight_transfer is not None:
        argv += ["--weight-transfer-config", json.dumps(weight_transfer)]
        env |= {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # vLLM's client pickles handles
    for key in ("VLLM_CACHE_ROOT", "TMPDIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    with launch(
        [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", *argv],
        workdir,
        config.port,
        name,
        env=env,
        what="bare vLLM",
    ) as server:
        yield server


def our_load(base_url: str, model: str, tokenizer: str, args) -> dict:
    from flywheel.clients.perf.load import LoadTarget, closed_loop
    from flywheel.clients.perf.metrics import summarize
    from flywheel.clients.perf.prompts import LocalTokenizer, synthetic_prompts

    target = LoadTarget(base_url=base_url, model=model)
    prompts = synthetic_prompts(
        LocalTokenizer(tokenizer), args.num_requests + 4, args.input_len, args.output_len, seed=args.seed
    )
    asyncio.run(closed_loop(target, prompts[:4], 4))  # warm-up, not measured
    results, duration, overhead = asyncio.run(closed_loop(target, prompts[4:], args.parallel))
    return summarize(results, duration) | overhead


def vllm_bench(server_url: str, model: str, tokenizer: str, args, out_dir: Path, rep: int) -> dict:
    name = f"vllm_bench_{rep}.json"
    cmd = [
        sys.executable,
        "-c",
        VLLM_BENCH,
        "--backend",
        "vllm",
        "--base-url",
        server_url,
        "--endpoint",
        "/v1/completions",
        "--model",
        model,
        "--tokenizer",
        tokenizer,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(args.input_len),
        "--random-output-len",
        str(args.output_len),
        "--num-prompts",
        str(args.num_requests),
        "--max-concurrency",
        str(args.parallel),
        "--ignore-eos",
        "--num-warmups",
        "4",
        "--disable-tqdm",
        "--seed",
        str(args.seed),
        "--temperature",
        "0",
        "--save-result",
        "--result-dir",
        str(out_dir),
        "--result-filename",
        name,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm.benchmarks.serve failed: {proc.stderr[-1500:]}")
    return json.loads((out_dir / name).read_text())


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-qwen3", help="bundled model name or HF folder")
    ap.add_argument("--parallel", type=int, default=16)
    ap.add_argument("--num-requests", type=int, default=96)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "perf_overhead.json")
    args = ap.parse_args()

    from flywheel.clients.servers import start_server
    from flywheel.server.models import resolve_model

    model_path = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="perf_overhead-"))
    t0 = time.time()
    ours_fw, bench_fw, ours_bare = [], [], []
    with start_server(model_path, work / "flywheel") as srv:
        for rep in range(args.reps):  # interleaved, so drift in the machine's load hits both alike
            ours_fw.append(our_load(srv.base_url, srv.model, str(model_path), args))
            bench_fw.append(vllm_bench(srv.url, srv.model, str(model_path), args, work, rep))
    with start_bare_vllm(model_path, work / "bare") as bare:
        for _ in range(args.reps):
            ours_bare.append(our_load(bare.base_url, bare.model, str(model_path), args))

    import vllm

    fw_tput, bare_tput = median(ours_fw, "output_throughput"), median(ours_bare, "output_throughput")
    fw_ttft, bare_ttft = median(ours_fw, "ttft_ms_p50"), median(ours_bare, "ttft_ms_p50")
    vb_tput = median(bench_fw, "output_throughput")
    result = {
        "command": " ".join([sys.executable, *sys.argv]),
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus",
        "versions": f"python {platform.python_version()}, vllm {vllm.__version__}",
        "model": args.model,
        "parallel": args.parallel,
        "num_requests": args.num_requests,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "reps": args.reps,
        "flywheel_output_throughput": fw_tput,
        "vllm_output_throughput": bare_tput,
        "flywheel_ttft_ms_p50": fw_ttft,
        "vllm_ttft_ms_p50": bare_ttft,
        "flywheel_vs_vllm_output_throughput_ratio": fw_tput / bare_tput,
        "flywheel_vs_vllm_ttft_p50_ratio": fw_ttft / bare_ttft,
        "vllm_bench_output_throughput": vb_tput,
        "vllm_bench_ttft_ms_p50": median(bench_fw, "median_ttft_ms"),
        "ours_vs_vllm_bench_output_throughput_ratio": fw_tput / vb_tput,
        "ours_client_cpu_fraction": median(ours_fw, "client_cpu_fraction"),
        "ours_loop_lag_ms_p99": median(ours_fw, "loop_lag_ms_p99"),
        "flywheel_output_throughput_reps": [r["output_throughput"] for r in ours_fw],
        "vllm_output_throughput_reps": [r["output_throughput"] for r in ours_bare],
        "vllm_bench_output_throughput_reps": [r["output_throughput"] for r in bench_fw],
        "errors": sum(r["errors"] for r in ours_fw + ours_bare) + sum(r.get("failed", 0) for r in bench_fw),
        "wall_s": time.time() - t0,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    for k in (
        "flywheel_vs_vllm_output_throughput_ratio",
        "flywheel_vs_vllm_ttft_p50_ratio",
        "ours_vs_vllm_bench_output_throughput_ratio",
    ):
        print(f"{k}: {result[k]:.4f}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
