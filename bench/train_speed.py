"""Training speed, megatron-core vs transformers, on the same model, batches and weights (issue 8).

For each model (a dense/MoE pair per size) one HF config is built; its random-init weights are
loaded into every variant, so every variant starts from the same weights:
  transformers   dense: sdpa attention; MoE: experts_implementation grouped_mm and eager (the serial loop)
  megatron       shipped: local spec as shipped (s x s attention, SequentialMLP experts)
                 fast:    SDPA core attention + GroupedExperts (grouped_mm) + sync-free permutation
                 fast_fused: fast + megatron's TE-free fusions (bias-dropout-add, SwiGLU, fused cross-entropy)
                 compiled: fast + every transformer layer torch.compile'd (regional) + a compiled
                           cross-entropy: inductor's Triton kernels in place of TE's fused RMSNorm,
                           RoPE, SwiGLU, residual adds and router ops
  transformers   *_compiled: the same regional compilation of HF's decoder layers, so the speed-up
                 of compilation is not credited to megatron alone
Before timing, each variant's loss on batch 0 is computed with the initial weights (loss parity).
Then: AdamW, warm-up steps, timed steps between two CUDA events (no host sync inside the loop; a
step never calls .item()), tokens/s, peak memory, MFU against a bf16 matmul rate measured in the
same process, and the number of host syncs one step makes (torch.cuda.set_sync_debug_mode).

  python bench/train_speed.py                      # on the GPU: sizes "issue" and "large"
  python bench/train_speed.py --toy                # CPU smoke run at toy size (fp32)
Writes bench/results/train_speed.json (flat keys; ratios named A_vs_B_ratio).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name -> (dense/MoE shared shape, dense FFN, MoE (experts, top-k, expert FFN), batch, seq)
SIZES = {
    # the configuration of issue 8
    "issue": dict(
        layers=8,
        hidden=1024,
        heads=16,
        kv_heads=4,
        head_dim=64,
        vocab=32000,
        ffn=4096,
        experts=32,
        topk=4,
        moe_ffn=512,
        batch=8,
        seq=1024,
    ),
    # larger pair: Qwen3-30B-A3B's attention and expert shapes (hidden 2048, 32/4 heads of 128,
    # experts of 768, top-8) with 64 experts and 12 layers so both backends fit side by side in time
    "large": dict(
        layers=12,
        hidden=2048,
        heads=32,
        kv_heads=4,
        head_dim=128,
        vocab=32000,
        ffn=8192,
        experts=64,
        topk=8,
        moe_ffn=768,
        batch=8,
        seq=2048,
    ),
    # the GPU loop's learner (bench/results/loop_gpu.json): Qwen3-0.6B's shapes, dense only; the
    # batch is one GRPO step of that loop (64 completions of ~128 tokens, packed to 8 x 1024)
    "qwen3_0_6b": dict(
        layers=28,
        hidden=1024,
        heads=16,
        kv_heads=8,
        head_dim=128,
        vocab=151936,
        ffn=3072,
        experts=0,
        topk=0,
        moe_ffn=0,
        batch=8,
        seq=1024,
        dense_only=True,
    ),
    "toy": dict(
        layers=2,
        hidden=64,
        heads=4,
        kv_heads=2,
        head_dim=16,
        vocab=512,
        ffn=128,
        experts=4,
        topk=2,
        moe_ffn=64,
        batch=2,
        seq=32,
    ),
}
NOMINAL_H200_BF16_FLOPS = 989e12  # dense bf16 tensor-core peak of an H100/H200 SXM


def hf_config(size: dict, moe: bool):
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["kv_heads"],
        head_dim=size["head_dim"],
        max_position_embeddings=max(4096, size["seq"]),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if moe:
        return Qwen3MoeConfig(
            **common,
            intermediate_size=size["ffn"],
            moe_intermediate_size=size["moe_ffn"],
            num_experts=size["experts"],
            num_experts_per_tok=size["topk"],
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            output_router_logits=False,
        )
    return Qwen3Config(**common, intermediate_size=size["ffn"])


def train_flops_per_token(size: dict, moe: bool) -> float:
    """6 x active matmul parameters + causal attention (6 * seq * heads * head_dim per layer)."""
    h, hd = size["hidden"], size["head_dim"]
    attn = h * hd * (2 * size["heads"] + 2 * size["kv_heads"])
    mlp = (h * size["experts"] + size["topk"] * 3 * h * size["moe_ffn"]) if moe else 3 * h * size["ffn"]
    params = size["layers"] * (attn + mlp) + size["vocab"] * h
    return 6.0 * params + 6.0 * size["layers"] * size["seq"] * size["heads"] * hd


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s at 8192^3 (GPU) or 1024^3 (CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 20 if device.type == "cuda" else 3
    elapsed = _timed(lambda: a @ b, reps, device)
    return 2 * n**3 * reps / elapsed


def _timed(fn, reps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return time.perf_counter() - t0


# ---------------------------------------------------------------- the two backends' loss functions


def hf_model(config, init_sd, device, dtype, experts_impl: str | None, compile_layers: bool = False):
    from transformers import AutoModelForCausalLM

    kwargs = {"attn_implementation": "sdpa", "dtype": dtype}
    if experts_impl:
        kwargs["experts_implementation"] = experts_impl
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.load_state_dict(init_sd)
    model.train()
    if compile_layers:  # the same regional compilation as megatron_compiled, for an even comparison
        for layer in model.model.layers:
            layer.compile(dynamic=False)
        model.model.norm.compile(dynamic=False)

    def loss_fn(ids, pos, targets):
        # use_cache=False: training keeps no KV cache (HF builds a DynamicCache otherwise)
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        # what HF's ForCausalLMLoss does: fp32 cross-entropy over the logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    return model, loss_fn


def megatron_model(
    config, init_sd, dtype, attention: str, experts: str, fused: bool = False, compile_layers: bool = False
):
    from flywheel.trainer.megatron.convert import load_hf_state_dict
    from flywheel.trainer.megatron.model import arch_from_hf, build_gpt
    from flywheel.trainer.policy_interface import ParallelConfig

    arch = arch_from_hf(config)
    model = build_gpt(
        arch,
        ParallelConfig(),
        dtype=dtype,
        attention=attention,
        experts=experts,
        fused=fused,
        compile_layers=compile_layers,
    )
    load_hf_state_dict(model, {k: v.to(next(model.parameters()).device) for k, v in init_sd.items()}, arch)
    model.train()

    def loss_fn(ids, pos, targets):
        return model(ids, pos, None, labels=targets).mean()  # megatron's vocab-parallel cross-entropy

    return model, loss_fn


# ---------------------------------------------------------------- one measurement


def count_syncs(step, device) -> int:
    if device.type != "cuda":
        return -1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()  # outside the window: our own sync is not the step's
    return sum("synchroniz" in str(w.message) for w in caught)


def top_kernels(step, device, n: int = 8) -> str:
    """The n kernels that took the most device time in one step: 'name ms; name ms; ...'."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    rows = sorted(prof.key_averages(), key=lambda e: getattr(e, attr, 0), reverse=True)[:n]
    return "; ".join(f"{e.key[:60]} {getattr(e, attr, 0) / 1000:.2f}ms" for e in rows)


def measure(build, batches, device, warmup: int, steps: int, profile: bool = False) -> dict:
    model, loss_fn = build()
    ids, pos, targets = batches[0]
    # with grad mode on, as in training: a compiled variant then compiles once, not twice
    initial_loss = float(loss_fn(ids, pos, targets).detach())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=device.type == "cuda")

    def step(i=0):
        ids, pos, targets = batches[i % len(batches)]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ids, pos, targets)
        loss.backward()
        opt.step()
        return loss

    for i in range(warmup):
        step(i)
    syncs = count_syncs(step, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    counter = iter(range(10**9))
    elapsed = _timed(lambda: step(next(counter)), steps, device)
    tokens = ids.numel() * steps
    top = top_kernels(step, device) if profile else None
    out = {
        "initial_loss": initial_loss,
        "ms_per_step": 1000 * elapsed / steps,
        "tokens_per_s": tokens / elapsed,
        "host_syncs_per_step": syncs,
        "params": sum(p.numel() for p in params),
    }
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if top:
        out["top_kernels"] = top
    model = opt = loss_fn = None  # drop the references (a `del` would unbind names the closures read)
    torch._dynamo.reset()  # compiled variants: each model compiles afresh (no recompile limit carried over)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


VARIANTS = {  # name -> (backend, options); dense models skip the expert-only variants
    "transformers_sdpa": ("hf", dict(experts_impl=None), "dense"),
    "transformers_grouped_mm": ("hf", dict(experts_impl="grouped_mm"), "moe"),
    "transformers_eager": ("hf", dict(experts_impl="eager"), "moe"),
    "transformers_sdpa_compiled": ("hf", dict(experts_impl=None, compile_layers=True), "dense"),
    "transformers_grouped_mm_compiled": ("hf", dict(experts_impl="grouped_mm", compile_layers=True), "moe"),
    "megatron_shipped": ("megatron", dict(attention="local", experts="sequential"), "both"),
    "megatron_fast": ("megatron", dict(attention="sdpa", experts="grouped"), "both"),
    "megatron_fast_fused": ("megatron", dict(attention="sdpa", experts="grouped", fused=True), "both"),
    "megatron_compiled": ("megatron", dict(attention="sdpa", experts="grouped", compile_layers=True), "both"),
}


def run_model(
    tag: str,
    size: dict,
    moe: bool,
    device,
    dtype,
    warmup: int,
    steps: int,
    slow_steps: int,
    variants: list[str] | None = None,
    profile: bool = False,
) -> dict:
    config = hf_config(size, moe)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        init = AutoModelForCausalLM.from_config(config, dtype=dtype)
    init_sd = {k: v.detach().cpu().clone() for k, v in init.state_dict().items()}
    del init
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        tokens = torch.randint(0, size["vocab"], (size["batch"], size["seq"] + 1), generator=g)
        pos = torch.arange(size["seq"]).expand(size["batch"], -1)
        batches.append((tokens[:, :-1].to(device), pos.to(device), tokens[:, 1:].contiguous().to(device)))
    results = {}
    for name, (backend, opts, kind) in VARIANTS.items():
        if kind != "both" and kind != ("moe" if moe else "dense"):
            continue
        if variants and name not in variants:
            continue
        slow = name in ("transformers_eager", "megatron_shipped") and moe
        if backend == "hf":
            build = lambda: hf_model(config, init_sd, device, dtype, **opts)  # noqa: E731
        else:
            build = lambda: megatron_model(config, init_sd, dtype, **opts)  # noqa: E731
        t0 = time.time()
        try:
            r = measure(
                build,
                batches,
                device,
                warmup=1 if slow else warmup,
                steps=slow_steps if slow else steps,
                profile=profile and not slow,
            )
        except Exception as exc:  # report and go on: one broken variant must not lose the others' numbers
            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        print(
            f"[{tag}] {name:<26} {r['ms_per_step']:9.1f} ms/step {r['tokens_per_s']:>12,.0f} tok/s "
            f"loss0 {r['initial_loss']:.5f} syncs {r['host_syncs_per_step']} "
            f"mem {r.get('peak_mem_gib', 0):.1f} GiB ({time.time() - t0:.0f}s)",
            flush=True,
        )
        results[name] = r
    return results


def flatten(tag: str, moe: bool, size: dict, results: dict, rate: float) -> dict:
    flat = {}
    flops_tok = train_flops_per_token(size, moe)
    base = "transformers_grouped_mm" if moe else "transformers_sdpa"
    for name, r in results.items():
        if "error" in r or "error" in results.get(base, {}):
            flat[f"{tag}_{name}_error"] = r.get("error", "baseline failed")
            continue
        for key, value in r.items():
            flat[f"{tag}_{name}_{key}"] = value
        flat[f"{tag}_{name}_mfu_vs_measured_matmul"] = r["tokens_per_s"] * flops_tok / rate
        flat[f"{tag}_{name}_mfu_vs_nominal_989tflops"] = r["tokens_per_s"] * flops_tok / NOMINAL_H200_BF16_FLOPS
        if base in results:
            flat[f"{tag}_{name}_loss0_minus_{base}_loss0"] = r["initial_loss"] - results[base]["initial_loss"]
    for meg in ("megatron_fast", "megatron_fast_fused", "megatron_shipped", "megatron_compiled"):
        for ref in (base, "transformers_eager", base + "_compiled"):
            if ref in results and "error" not in results[ref] and "error" not in results.get(meg, {"error": 1}):
                flat[f"{tag}_{meg}_vs_{ref}_ratio"] = results[meg]["tokens_per_s"] / results[ref]["tokens_per_s"]
    flat[f"{tag}_train_flops_per_token"] = flops_tok
    return flat


def run_parallel(args) -> int:
    """One-GPU phase, then the N-GPU phase under torchrun; the second merges the first's numbers."""
    import os
    import subprocess

    here = Path(__file__).resolve().parent
    out = args.out if args.out.name != "train_speed.json" else args.out.with_name(f"train_speed_{args.gpus}gpu.json")
    single = out.with_name(out.stem + "_single.json")
    common = (
        ["--steps", str(args.steps), "--warmup", str(args.warmup)]
        + (["--toy"] if args.toy else [])
        + (["--bf16"] if args.bf16 else [])
        + (["--sizes", *args.sizes] if args.sizes else [])
    )
    # NVLink multicast stays off (this machine's hosts are shared: KINDS.md)
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    script = str(here / "train_speed_parallel.py")
    subprocess.run([sys.executable, script, "--phase", "single", "--out", str(single), *common], env=env, check=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(args.gpus),
            script,
            "--phase",
            "multi",
            "--single",
            str(single),
            "--out",
            str(out),
            *common,
        ],
        env=env,
        check=True,
    )
    merged = json.loads(out.read_text())
    merged["command"] = " ".join(["python"] + sys.argv)
    merged.update(
        {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "machine": platform.node(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        }
    )
    out.write_text(json.dumps(merged, indent=1))
    for key, value in merged.items():
        if key.endswith(("_ratio", "_scaling_efficiency")):
            print(f"{key:<60} {value:6.2f}")
    print(f"wrote {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes", nargs="+", default=None, choices=list(SIZES), help="model sizes (default: issue large; --toy: toy)"
    )
    parser.add_argument("--toy", action="store_true", help="toy size on the CPU in fp32 (a smoke test of this script)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--slow-steps", type=int, default=3, help="timed steps of the serial-expert variants")
    parser.add_argument("--profile", action="store_true", help="record the top kernels of one step per variant")
    parser.add_argument("--bf16", action="store_true", help="bf16 on the CPU too (the GPU always runs bf16)")
    parser.add_argument(
        "--variants", nargs="+", default=None, choices=list(VARIANTS), help="variants to run (default: all)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train_speed.json")
    parser.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="> 1: megatron TP/EP/DP over this many GPUs with torchrun "
        "(bench/train_speed_parallel.py; writes train_speed_<N>gpu.json)",
    )
    args = parser.parse_args()
    if args.gpus > 1:
        return run_parallel(args)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.toy else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" or args.bf16 else torch.float32
    sizes = args.sizes or (["toy"] if args.toy else ["issue", "large"])

    from flywheel.trainer.megatron.parallel import init_parallel
    from flywheel.trainer.policy_interface import ParallelConfig

    init_parallel(ParallelConfig())
    # the same generous recompile budget for both backends' compiled variants (8 by default)
    torch._dynamo.config.recompile_limit = 32
    rate = matmul_rate(device, dtype)
    print(f"measured {dtype} matmul rate: {rate / 1e12:.1f} TFLOP/s on {device}", flush=True)
    import megatron.core
    import transformers

    flat = {
        "command": " ".join(["python"] + sys.argv),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "machine": platform.node(),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "megatron_core": megatron.core.__version__,
        "python": platform.python_version(),
        "measured_matmul_tflops": rate / 1e12,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "timed_steps_serial_experts": args.slow_steps,
    }
    for size_name in sizes:
        size = SIZES[size_name]
        for moe in (False,) if size.get("dense_only") else (False, True):
            tag = f"{size_name}_{'moe' if moe else 'dense'}"
            flat[f"{tag}_config"] = json.dumps(
                {
                    k: v
                    for k, v in size.items()
                    if k != "dense_only" and (moe or k not in ("experts", "topk", "moe_ffn"))
                }
            )
            results = run_model(
                tag, size, moe, device, dtype, args.warmup, args.steps, args.slow_steps, args.variants, args.profile
            )
            flat.update(flatten(tag, moe, size, results, rate))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(flat, indent=1, sort_keys=False))  # partial results survive a timeout
    # the headline of issue 14: both learners compiled, on the first size run
    head = f"{sizes[0]}_dense_megatron_compiled_vs_transformers_sdpa_compiled_ratio"
    if head in flat:
        flat["megatron_vs_transformers_ratio"] = flat[head]
        args.out.write_text(json.dumps(flat, indent=1, sort_keys=False))
    for key, value in flat.items():
        if key.endswith("_ratio"):
            print(f"{key:<70} {value:6.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
