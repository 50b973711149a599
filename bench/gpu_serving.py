"""Flywheel on one GPU against bare vLLM in the same run: serving overhead, and the weight push.

    python bench/gpu_serving.py --shape qwen3-0.6b              # perf_overhead_gpu.json + weight_push_gpu.json
    python bench/gpu_serving.py --shape qwen3-8b --no-perf      # the push of an 8B-shaped model (adds its rows)
    python bench/gpu_serving.py --shape tiny --pushes 2         # CPU smoke run: serving part + shm push only

1. A random-init model of a real shape (transformers `from_config`, bf16, the Qwen3 tokenizer of the
   bundled tiny-qwen3), with its embeddings sharpened so that logprobs are far from uniform.
2. Both servers at once on the GPU, with the same engine flags (`server.serve.vllm_argv`, each at
   --gpu-memory-utilization): `flywheel serve` with its GPU defaults (torch.compile + CUDA graphs,
   vLLM's max_num_seqs, weight transports shm/http/ipc) and bare vLLM's OpenAI server carrying
   vLLM's own CUDA-IPC weight-transfer engine (dev mode). Idle, one costs the other nothing.
3. Serving: our closed-loop load (clients/perf, the same as bench/perf_overhead.py) at each
   concurrency, alternating the two servers (order swapped each rep): output tok/s, TTFT p50.
4. Push, the learner being this process with the model on the same GPU, alternating A and B:
   - flywheel: `push_weights(transport="ipc")`: validate, pause, map the handles, NaN/Inf check,
     vLLM's layerwise load, prefix-cache reset, publish the version;
   - vLLM's own: `IPCTrainerWeightTransferEngine.send_weights()` through vLLM's HTTP client into the
     bare server (start / update / finish; no pause, no validation, handles pickled);
   - d2d: a device-to-device copy of the same tensors into preallocated ones (the memory floor).
   Correct, not only fast: after each push the served prompt logprobs are compared with the
   learner's own HF forward on the weights just pushed (and on the other set, which must differ).
Writes bench/results/perf_overhead_gpu.json and weight_push_gpu.json (flat keys; --tag suffixes them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
os.environ.setdefault("FLYWHEEL_HOME", str(REPO / ".flywheel"))

SHAPES = {  # Qwen3 configs of the released models' shapes (random weights)
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=128,
        tie_word_embeddings=True,
    ),
    "qwen3-0.6b": dict(
        hidden_size=1024,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=3072,
        tie_word_embeddings=True,
    ),
    "qwen3-8b": dict(
        hidden_size=4096,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=12288,
        tie_word_embeddings=False,
    ),
}
PROBE = "The quick brown fox jumps over the lazy dog. " * 4


def build_model(shape: str, folder: Path, device: str, seed: int):
    """Random model of `shape` saved as an HF folder (bf16 safetensors + tokenizer); returns it (on device)."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from flywheel.server.models import resolve_model

    config = Qwen3Config(
        vocab_size=151936,
        max_position_embeddings=40960,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
        **SHAPES[shape],
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)  # as tiny-qwen3: peaked next-token distributions
    if not (folder / "config.json").is_file():
        model.save_pretrained(folder, safe_serialization=True)
        GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643).save_pretrained(folder)
        tokenizer = resolve_model("tiny-qwen3")
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            if (tokenizer / name).is_file():
                shutil.copy(tokenizer / name, folder / name)
    return model.eval()


def perturbed(model, seed: int):
    """Weights B: every tensor of A moved a little (same shapes), as a new module on the same device."""
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(
                0.05 * p.float().std().to(p.dtype) * torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype)
            )
    return other


def served_logprobs(url: str, model: str, ids: list[int]) -> list[float]:
    r = httpx.post(
        url + "/v1/completions",
        timeout=120,
        json={"model": model, "prompt": ids, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0},
    )
    r.raise_for_status()
    rows = r.json()["choices"][0]["prompt_logprobs"][1:]
    return [row[str(t)]["logprob"] for row, t in zip(rows, ids[1:])]


def learner_logprobs(model, ids: list[int]) -> list[float]:
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device)).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(ids[1:], device=device)[:, None])[:, 0].tolist()


def mean_abs(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def both_servers(folder: Path, work: Path, args):
    """flywheel serve and bare vLLM, started at the same time (their start-ups overlap). Each lives in
    a thread that stays until the end: the servers die with the thread that started them
    (clients/servers.py sets PR_SET_PDEATHSIG, which follows the parent *thread*)."""
    from perf_overhead import start_bare_vllm

    from flywheel.clients.servers import start_server, vllm_lock

    gpu = torch.cuda.is_available()
    common = {
        "max_model_len": args.max_model_len,
        "max_num_seqs": None if gpu else 32,
        "dtype": "bfloat16" if gpu else "auto",
    }
    if gpu:
        common["gpu_memory_utilization"] = args.gpu_memory_utilization
    launches = {
        "flywheel": start_server(folder, work / "flywheel", served_model_name="m", **common),
        "vllm": start_bare_vllm(
            folder, work / "bare", served_model_name="m", weight_transfer={"backend": "ipc"} if gpu else None, **common
        ),
    }
    servers, errors, ready, done = {}, {}, threading.Semaphore(0), threading.Event()

    def hold(name, cm):
        try:
            with cm as server:
                servers[name] = server
                ready.release()
                done.wait()
        except Exception as exc:  # reported below
            errors[name] = exc
            ready.release()

    with vllm_lock():  # held here, so the two launches share it (re-entrant)
        threads = [threading.Thread(target=hold, args=item) for item in launches.items()]
        t0 = time.time()
        for t in threads:
            t.start()
        try:
            for _ in threads:
                ready.acquire()
            if errors:
                raise RuntimeError(f"server start failed: {errors}")
            print(f"both servers ready in {time.time() - t0:.0f} s", flush=True)
            yield servers["flywheel"], servers["vllm"], time.time() - t0
        finally:
            done.set()
            for t in threads:
                t.join(120)


def serving(fw, bare, folder: Path, args) -> dict:
    from perf_overhead import our_load

    out = {}
    for c in args.concurrency:
        load = SimpleNamespace(
            num_requests=max(8, c * args.requests_per_slot),
            input_len=args.input_len,
            output_len=args.output_len,
            parallel=c,
            seed=args.seed,
        )
        rows = {"flywheel": [], "vllm": []}
        for rep in range(args.reps):
            order = [("flywheel", fw), ("vllm", bare)][:: 1 if rep % 2 == 0 else -1]
            for name, srv in order:
                rows[name].append(our_load(srv.base_url, "m", str(folder), load))
                r = rows[name][-1]
                print(
                    f"c={c} rep {rep} {name}: {r['output_throughput']:.0f} tok/s, TTFT p50 {r['ttft_ms_p50']:.1f} ms, "
                    f"errors {r['errors']} {r.get('first_error', '')}",
                    flush=True,
                )
                if r["errors"] == r["requests"]:
                    raise RuntimeError(f"{name} answered no request at c={c}: {r.get('first_error')}")
        for name in rows:
            out[f"c{c}_{name}_output_throughput"] = statistics.median(r["output_throughput"] for r in rows[name])
            out[f"c{c}_{name}_ttft_ms_p50"] = statistics.median(r["ttft_ms_p50"] for r in rows[name])
            out[f"c{c}_{name}_output_throughput_reps"] = [round(r["output_throughput"], 1) for r in rows[name]]
            out[f"c{c}_{name}_errors"] = sum(r["errors"] for r in rows[name])
        out[f"c{c}_throughput_vs_vllm_ratio"] = (
            out[f"c{c}_flywheel_output_throughput"] / out[f"c{c}_vllm_output_throughput"]
        )
        out[f"c{c}_ttft_p50_vs_vllm_ratio"] = out[f"c{c}_flywheel_ttft_ms_p50"] / out[f"c{c}_vllm_ttft_ms_p50"]
    # the headline: the worst concurrency for each (the goal holds only if it holds at every one)
    out["throughput_vs_vllm_ratio"] = min(out[f"c{c}_throughput_vs_vllm_ratio"] for c in args.concurrency)
    out["ttft_p50_vs_vllm_ratio"] = max(out[f"c{c}_ttft_p50_vs_vllm_ratio"] for c in args.concurrency)
    return out


def pushes(fw, bare, model_a, args, tokenizer_dir: Path) -> dict:
    from transformers import AutoTokenizer

    from flywheel.server.status import fetch_status
    from flywheel.server.weights.client import push_weights
    from flywheel.server.weights.worker import non_finite

    gpu = torch.cuda.is_available()
    model_b = perturbed(model_a, seed=7)
    weights = {"A": dict(model_a.named_parameters()), "B": dict(model_b.named_parameters())}
    modules = {"A": model_a, "B": model_b}
    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(PROBE)["input_ids"]
    reference = {k: learner_logprobs(m, ids) for k, m in modules.items()}
    nbytes = sum(t.numel() * t.element_size() for t in weights["A"].values())
    out = {
        "push_tensors": len(weights["A"]),
        "push_bytes": nbytes,
        "learner_logprob_gap_a_vs_b": mean_abs(reference["A"], reference["B"]),
    }

    # d2d: copy the same tensors into preallocated ones (what a push cannot beat)
    dst = {n: torch.empty_like(t) for n, t in weights["A"].items()}
    d2d = []
    for i in range(args.pushes + 1):
        src = weights["AB"[i % 2]]
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            for n, t in src.items():
                dst[n].copy_(t)
        sync()
        d2d.append(time.perf_counter() - t0)
    out["d2d_copy_s"] = statistics.median(d2d[1:])
    del dst
    check = []
    for _ in range(3):
        t0 = time.perf_counter()
        assert non_finite(weights["A"].items()) == []
        check.append(time.perf_counter() - t0)
    out["nonfinite_check_s"] = statistics.median(check)

    # Flywheel's push (first one timed apart: it maps the learner's memory for the first time)
    transport = "ipc" if gpu else "shm"
    rows, gaps = [], []
    version = fetch_status(fw.url).policy_version
    for i in range(args.pushes + 1):
        which = "BA"[i % 2]
        version += 1
        sync()
        t0 = time.perf_counter()
        result = push_weights(fw.url, weights[which], version, fw.admin_token, transport=transport)
        wall = time.perf_counter() - t0
        rows.append({"wall": wall, **result["seconds"]})
        served = served_logprobs(fw.url, "m", ids)
        gaps.append((mean_abs(served, reference[which]), mean_abs(served, reference["AB"[i % 2]])))
        print(
            f"flywheel {transport} push {i} ({which}): {wall:.3f} s {result['seconds']}; served vs pushed "
            f"{gaps[-1][0]:.4f}, vs the other {gaps[-1][1]:.4f}",
            flush=True,
        )
    out |= {
        "flywheel_push_first_s": rows[0]["wall"],
        "flywheel_push_s": statistics.median(r["wall"] for r in rows[1:]),
        "flywheel_push_transport": transport,
        "flywheel_push_s_reps": [round(r["wall"], 4) for r in rows[1:]],
    }
    for key in ("validate", "pause", "apply", "total"):
        out[f"flywheel_push_{key}_s"] = statistics.median(r[key] for r in rows[1:] if key in r)
    out["served_vs_pushed_logprob_gap_max"] = max(g for g, _ in gaps)
    out["served_vs_other_logprob_gap_min"] = min(g for _, g in gaps)

    if gpu:  # vLLM's own CUDA-IPC engine, over vLLM's own HTTP client, into the bare server
        from vllm.distributed.weight_transfer.base import ModuleSource
        from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo, IPCTrainerWeightTransferEngine

        client = HTTPVLLMWeightSyncClient(bare.url)
        engines = {
            k: IPCTrainerWeightTransferEngine.trainer_init(
                IPCTrainerInitInfo(rank=0), client=client, source=ModuleSource(m)
            )
            for k, m in modules.items()
        }
        own, own_gaps = [], []
        for i in range(args.pushes + 1):
            which = "BA"[i % 2]
            sync()
            t0 = time.perf_counter()
            engines[which].send_weights()
            own.append(time.perf_counter() - t0)
            served = served_logprobs(bare.url, "m", ids)
            own_gaps.append(mean_abs(served, reference[which]))
            print(f"vLLM ipc push {i} ({which}): {own[-1]:.3f} s; served vs pushed {own_gaps[-1]:.4f}", flush=True)
        out |= {
            "vllm_ipc_push_first_s": own[0],
            "vllm_ipc_push_s": statistics.median(own[1:]),
            "vllm_ipc_push_s_reps": [round(x, 4) for x in own[1:]],
            "vllm_served_vs_pushed_logprob_gap_max": max(own_gaps),
        }
        out["push_vs_vllm_ipc_ratio"] = out["flywheel_push_s"] / out["vllm_ipc_push_s"]
    out["push_vs_d2d_copy_ratio"] = out["flywheel_push_s"] / out["d2d_copy_s"]
    return out


def write(path: Path, rows: dict, meta: dict) -> None:
    old = json.loads(path.read_text()) if path.is_file() else {}
    merged = old | meta | rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2))
    print(f"wrote {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-0.6b")
    ap.add_argument("--work", type=Path, default=None, help="model folders and server logs (default: a temp folder)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--requests-per-slot", type=int, default=3, help="requests per concurrent slot (at least 8 in all)")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--pushes", type=int, default=5, help="timed pushes per method (after one untimed first push)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3, help="per server (both share the GPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-perf", action="store_true", help="only the push part")
    ap.add_argument("--no-push", action="store_true", help="only the serving part")
    ap.add_argument("--results", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()

    import vllm

    gpu = torch.cuda.is_available()
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_serving-"))
    folder = work / f"{args.shape}-random"
    t0 = time.time()
    model = build_model(args.shape, folder, "cuda" if gpu else "cpu", args.seed)
    meta = {
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.node()} {os.cpu_count()} cpus",
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, vllm {vllm.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    suffix = "_gpu" if gpu else "_cpu_smoke"
    with both_servers(folder, work, args) as (fw, bare, ready_s):
        if not args.no_perf:
            perf = serving(fw, bare, folder, args)
            write(
                args.results / f"perf_overhead{suffix}.json",
                perf,
                meta
                | {
                    "model": f"{args.shape} (random weights, bf16)",
                    "concurrency": args.concurrency,
                    "input_len": args.input_len,
                    "output_len": args.output_len,
                    "reps": args.reps,
                    "servers_ready_s": ready_s,
                    "flywheel_flags": "flywheel serve defaults on GPU (compiled, CUDA graphs, vLLM's max_num_seqs)",
                    "gpu_memory_utilization": args.gpu_memory_utilization,
                },
            )
        if not args.no_push:
            push = pushes(fw, bare, model, args, folder)
            tag = args.shape.replace("-", "_").replace(".", "_")  # several shapes' rows in one file
            rows = {f"{tag}_{k}": v for k, v in push.items()}
            if args.shape == "qwen3-0.6b":  # the headline keys
                rows |= {
                    "push_0_6b_s": push["flywheel_push_s"],
                    "push_vs_vllm_ipc_ratio": push.get("push_vs_vllm_ipc_ratio"),
                }
            write(args.results / f"weight_push{suffix}.json", rows, meta)
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
