"""Benchmark: a full weight push into a live server, per transport, against the bounds measured in the same run.

For each model: start `flywheel serve` (with vLLM's dev routes, for the reload baseline), then
  memcpy     : copying the same fp32 tensors once in this process (torch clone) -- the bandwidth bound;
  reload     : vLLM's own `reload_weights` (POST /collective_rpc) from an fp32 safetensors folder of the
               same tensors, i.e. the same bytes and dtype as the pushes (the baseline; the folder was just
               written, so it is read from the page cache, not the disk);
  reload_bf16: the same from the bundled bf16 folder (half the bytes, cast on load), for reference;
  shm/http   : push_weights(fp32 state_dict, transport=...) end to end (serialize, transfer, validate,
               pause, apply, prefix-cache reset, resume), median of --repeats;
  shm_reused : the same over shm with a ShmBuckets, as the trainer pushes: each push overwrites the
               previous push's files;
  shm_folder : push_weights(the fp32 folder) over shm: the files are handed over, not re-serialised;
  *_layerwise: shm_reused and shm_folder again on a server started with weight_apply=layerwise
               (vLLM's in-place layerwise reload: the apply before server/weights/apply.py).
The first push of each row (excluded from the median; it builds the server's staging tensors) is
reported as *_first_push_s.
The served model is fp32 (CPU), so every variant moves and loads the same fp32 bytes.
Writes bench/results/weight_push.json (flat keys; ratios are A_vs_B_ratio = seconds_A / seconds_B).

    python bench/weight_push.py [--models tiny-qwen3 tiny-qwen3-moe smollm2-135m-instruct qwen3-0.6b-random] \
        [--repeats 3]

--adapter-ranks R ... (issue 20): on one server started with --max-lora-rank max(R), in the same run,
  full       : the fp32 full push over shm (reused buckets), as the trainer pushes without LoRA;
  adapter_rR : push_adapter of a rank-R adapter on the default targets (attention and MLP projections;
               B drawn small and non-zero so it changes the answers), versioned like a full push;
  throughput : output tok/s of --concurrency streams of --gen-tokens tokens, base model name vs the
               adapter's name, alternated --repeats times (medians), after the last adapter push.
With --merge the keys are added to the existing --out file instead of replacing it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flywheel.clients.servers import start_server  # noqa: E402
from flywheel.server.models import resolve_model  # noqa: E402
from flywheel.server.weights.client import push_adapter, push_weights  # noqa: E402
from flywheel.server.weights.shm_buckets import ShmBuckets  # noqa: E402


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


RANDOM_MODELS = {
    # Qwen3-0.6B's shapes (28 layers, hidden 1024, tied embeddings), random weights: 0.6B params, 2.4 GB fp32
    "qwen3-0.6b-random": dict(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=151643,
    ),
}


def model_folder(name: str, workdir: Path) -> Path:
    """A bundled model, or one of RANDOM_MODELS built here (random init, fp32, the real Qwen tokenizer)."""
    if name not in RANDOM_MODELS:
        return resolve_model(name)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from flywheel.server.models import qwen_tokenizer

    out = workdir / name
    torch.manual_seed(0)
    Qwen3ForCausalLM(Qwen3Config(**RANDOM_MODELS[name])).save_pretrained(out, safe_serialization=True)
    qwen_tokenizer(out)
    return out


def bench_model(name: str, repeats: int, workdir: Path) -> dict:
    model_dir = model_folder(name, workdir)
    sd = fp32_state_dict(model_dir)
    nbytes = tensor_bytes(sd)
    memcpy = median_seconds(lambda: [t.clone() for t in sd.values()], repeats)
    fp32_dir = workdir / f"{name}-fp32"
    fp32_dir.mkdir(parents=True)
    save_file(sd, str(fp32_dir / "model.safetensors"))
    out = {f"{name}_bytes": nbytes, f"{name}_memcpy_s": round(memcpy, 4)}
    version = [0]
    for apply in ("staged", "layerwise"):
        # staged: Flywheel's CPU apply (the default); layerwise: vLLM's in-place reload, the "before"
        suffix = "" if apply == "staged" else "_layerwise"
        with start_server(
            model_dir, workdir / f"{name}-{apply}", served_model_name="m", dev_routes=True, weight_apply=apply
        ) as srv:
            if apply == "staged":
                reload_baselines(srv, name, model_dir, fp32_dir, repeats, out)
                out[f"{name}_reload_vs_memcpy_ratio"] = round(out[f"{name}_reload_s"] / memcpy, 3)

            def push(transport, weights, buckets=None):
                version[0] += 1
                return push_weights(srv.url, weights, version[0], srv.admin_token, transport=transport, buckets=buckets)

            with ShmBuckets() as buckets:
                rows = [("shm_reused", "shm", sd, buckets), ("shm_folder", "shm", fp32_dir, None)]
                if apply == "staged":
                    rows += [("shm", "shm", sd, None), ("http", "http", sd, None)]
                for label, transport, weights, reuse in rows:
                    label += suffix
                    t0 = time.perf_counter()
                    push(transport, weights, reuse)  # warm-up: reads the manifest, builds the staging tensors
                    out[f"{name}_{label}_first_push_s"] = round(time.perf_counter() - t0, 4)
                    parts = []
                    seconds = median_seconds(lambda: parts.append(push(transport, weights, reuse)), repeats)
                    out[f"{name}_{label}_push_s"] = round(seconds, 4)
                    out[f"{name}_{label}_push_GBps"] = round(nbytes / seconds / 1e9, 3)
                    # where the time went (medians): client serialisation, server apply (pause..resume inside vLLM)
                    out[f"{name}_{label}_serialize_s"] = round(
                        statistics.median(p["client_seconds"]["serialize"] for p in parts), 4
                    )
                    out[f"{name}_{label}_apply_s"] = round(statistics.median(p["seconds"]["apply"] for p in parts), 4)
                    out[f"{name}_{label}_push_vs_memcpy_ratio"] = round(seconds / memcpy, 3)
                    out[f"{name}_{label}_push_vs_reload_ratio"] = round(seconds / out[f"{name}_reload_s"], 3)
            check = httpx.post(
                srv.base_url + "/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2}, timeout=60
            )
            out[f"{name}_serves_after_pushes{suffix}"] = check.status_code == 200
    for label in ("shm_reused", "shm_folder"):
        out[f"{name}_{label}_staged_vs_layerwise_apply_ratio"] = round(
            out[f"{name}_{label}_apply_s"] / out[f"{name}_{label}_layerwise_apply_s"], 3
        )
    return out


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def random_adapter(model_dir: Path, rank: int, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """A rank-`rank` PEFT adapter on the default LoRA targets with small random A and B (B = 0 would
    serve exactly the base), in the names and config a trained policy's adapter_state() returns."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from flywheel.trainer.policy_interface import LoraConfig

    lora = LoraConfig(rank=rank)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = PeftLoraConfig(r=rank, lora_alpha=lora.scale_alpha, target_modules=lora.targets, lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02 / rank)
    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    return tensors, model.peft_config["default"].to_dict()


def output_tokens_per_s(base_url: str, model: str, concurrency: int, tokens: int) -> float:
    """`concurrency` greedy completions of exactly `tokens` tokens at once, through flywheel perf's
    closed-loop load generator; output tokens / wall second."""
    import asyncio

    from flywheel.clients.perf.load import LoadTarget, closed_loop
    from flywheel.clients.perf.metrics import summarize
    from flywheel.clients.perf.prompts import Prompt

    prompts = [Prompt(text=f"Story number {i}:", input_len=4, output_len=tokens) for i in range(concurrency)]
    results, duration, _ = asyncio.run(closed_loop(LoadTarget(base_url=base_url, model=model), prompts, concurrency))
    summary = summarize(results, duration)
    if summary["errors"]:
        raise RuntimeError(f"throughput run on {model}: {summary['first_error']}")
    return summary["output_throughput"]


def bench_adapter(name: str, ranks: list[int], repeats: int, workdir: Path, concurrency: int, gen_tokens: int):
    """Adapter-only pushes vs the full push, and serving with the adapter vs the base, on one server."""
    model_dir = model_folder(name, workdir)
    sd = fp32_state_dict(model_dir)
    out = {f"{name}_bytes": tensor_bytes(sd)}
    adapters = {r: random_adapter(model_dir, r, seed=r) for r in ranks}
    versions = itertools.count(1)  # every push, full or adapter, is the next version
    with start_server(model_dir, workdir / f"{name}-lora", served_model_name="m", max_lora_rank=max(ranks)) as srv:
        with ShmBuckets() as buckets:
            full = lambda: push_weights(srv.url, sd, next(versions), srv.admin_token, transport="shm", buckets=buckets)  # noqa: E731
            full()  # warm-up: builds the staging tensors
            out[f"{name}_full_push_s"] = round(median_seconds(full, repeats), 4)
        for rank, (tensors, config) in adapters.items():
            push = lambda: push_adapter(srv.url, tensors, config, next(versions), srv.admin_token, source="bench")  # noqa: E731, B023
            t0 = time.perf_counter()
            answer = push()  # the first load of an adapter of this rank
            out[f"{name}_adapter_r{rank}_first_push_s"] = round(time.perf_counter() - t0, 4)
            out[f"{name}_adapter_r{rank}_push_s"] = round(median_seconds(push, repeats), 4)
            out[f"{name}_adapter_r{rank}_bytes"] = tensor_bytes(tensors)
            out[f"{name}_adapter_r{rank}_apply_s"] = answer.get("seconds", {}).get("apply")
            out[f"{name}_adapter_r{rank}_vs_full_push_ratio"] = round(
                out[f"{name}_adapter_r{rank}_push_s"] / out[f"{name}_full_push_s"], 4
            )
        served = {m["id"] for m in httpx.get(srv.base_url + "/models", timeout=30).json()["data"]}
        out[f"{name}_models_listed"] = sorted(served)
        output_tokens_per_s(srv.base_url, "m", 2, 4)  # warm-up of both paths
        output_tokens_per_s(srv.base_url, "policy", 2, 4)
        rates = {"m": [], "policy": []}
        for _ in range(repeats):
            for model in ("m", "policy"):
                rates[model].append(output_tokens_per_s(srv.base_url, model, concurrency, gen_tokens))
        base_rate, lora_rate = statistics.median(rates["m"]), statistics.median(rates["policy"])
        out[f"{name}_base_output_tok_s"] = round(base_rate, 2)
        out[f"{name}_lora_r{max(ranks)}_output_tok_s"] = round(lora_rate, 2)
        out[f"{name}_throughput_concurrency"] = concurrency
        out[f"{name}_throughput_gen_tokens"] = gen_tokens
    first = min(ranks)
    out["adapter_vs_full_push_ratio"] = out[f"{name}_adapter_r{first}_vs_full_push_ratio"]
    out["adapter_vs_full_push_ratio_rank"] = first
    out["lora_vs_base_throughput_ratio"] = round(lora_rate / base_rate, 4)
    out["lora_vs_base_throughput_ratio_rank"] = max(ranks)
    return out


def reload_baselines(srv, name: str, model_dir: Path, fp32_dir: Path, repeats: int, out: dict) -> None:
    """vLLM's own reload_weights (dev route) from the fp32 folder, and from the bundled bf16 one."""

    def reload(folder):
        r = httpx.post(
            srv.url + "/collective_rpc",
            headers=srv.admin_headers,
            timeout=600,
            json={"method": "reload_weights", "kwargs": {"weights_path": str(folder)}},
        )
        r.raise_for_status()

    for key, folder in (("reload_bf16", model_dir), ("reload", fp32_dir)):
        reload(folder)  # warm-up
        out[f"{name}_{key}_s"] = round(median_seconds(lambda: reload(folder), repeats), 4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--models", nargs="+", default=["tiny-qwen3", "tiny-qwen3-moe", "smollm2-135m-instruct", "qwen3-0.6b-random"]
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "weight_push.json")
    ap.add_argument("--adapter-ranks", type=int, nargs="+", help="the LoRA rows instead of the full-push rows")
    ap.add_argument("--concurrency", type=int, default=8, help="LoRA rows: concurrent streams for throughput")
    ap.add_argument("--gen-tokens", type=int, default=64, help="LoRA rows: tokens per stream for throughput")
    ap.add_argument("--merge", action="store_true", help="add the keys to the existing --out file")
    args = ap.parse_args()
    import vllm

    results: dict = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.node()} {platform.machine()} {torch.get_num_threads()} threads",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "repeats": args.repeats,
        "load_average_at_start": round(os.getloadavg()[0], 2),
    }
    with tempfile.TemporaryDirectory(prefix="fwbench-") as tmp:
        for name in args.models:
            if args.adapter_ranks:
                rows = bench_adapter(
                    name, args.adapter_ranks, args.repeats, Path(tmp), args.concurrency, args.gen_tokens
                )
            else:
                rows = bench_model(name, args.repeats, Path(tmp))
            results.update(rows)
            print(json.dumps(rows, indent=1), flush=True)
    results["load_average_at_end"] = round(os.getloadavg()[0], 2)
    if args.merge and args.out.exists():  # the earlier rows stay; this run's keys say how they were made
        tag = "lora_" if args.adapter_ranks else ""
        meta = (
            "command",
            "machine",
            "python",
            "torch",
            "vllm",
            "repeats",
            "load_average_at_start",
            "load_average_at_end",
        )
        results = {
            **json.loads(args.out.read_text()),
            **{(tag + k if k in meta else k): v for k, v in results.items()},
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    for k, v in results.items():
        if k.endswith("_ratio"):
            print(f"{k:55s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
