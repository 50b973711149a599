"""Multi-GPU training speed of the megatron backend (issue 9): TP=2, EP=2 and DP=2 against one GPU.

The trainer's own path is measured: `MegatronPolicy` (trainer/megatron/policy.py) built from an HF
folder with `PolicyConfig.parallel`, its forward_logprobs, finalize_grads (the TP / DP / expert-DP
reductions) and fused AdamW. The models, batches and timing are bench/train_speed.py's: the same HF
configs ("issue", "large"), the same global batch (DP ranks take halves of it, TP/EP ranks all of it).

  python bench/train_speed.py --gpus 2          # runs both phases below and merges them
  # phase 1, one GPU:   python bench/train_speed_parallel.py --phase single --out S.json
  # phase 2, two GPUs:  torchrun --nproc-per-node 2 bench/train_speed_parallel.py --phase multi --single S.json
  python bench/train_speed_parallel.py --toy ...   # CPU/gloo smoke run at toy size (fp32)

Per layout: tokens/s of the global batch, scaling efficiency = tokens/s / (GPUs x one-GPU tokens/s),
peak memory (max over ranks), and the step-0 loss minus the one-GPU step-0 loss (loss parity: the
same weights and batch give the same loss whatever the layout, up to bf16 reduction order).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_speed import SIZES, _timed, hf_config  # noqa: E402

LAYOUTS = {  # name -> (tensor, expert, which models); the data-parallel degree is what is left
    "single": (1, 1, "both"),
    "dp2": (1, 1, "both"),
    "tp2": (2, 1, "dense"),
    "ep2": (1, 2, "moe"),
}


def save_hf_model(size: dict, moe: bool, folder: Path, dtype: torch.dtype) -> None:
    """Random-init HF model (seed 0, as bench/train_speed.py) plus a stand-in word-level tokenizer
    (the policy loads one; the bench feeds token ids and never tokenizes)."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(size, moe), dtype=dtype)
    model.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(size["vocab"])}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0"
    )
    tokenizer.save_pretrained(folder)


def global_batches(size: dict, n: int = 4):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, size["vocab"], (size["batch"], size["seq"] + 1), generator=g)
        pos = torch.arange(size["seq"]).expand(size["batch"], -1).contiguous()
        out.append((tokens[:, :-1], pos, tokens[:, 1:].contiguous()))
    return out


def build_policy(folder: Path, tensor: int, expert: int, bf16: bool, compiled: bool):
    from flywheel.trainer.megatron.model import compile_transformer_layers
    from flywheel.trainer.megatron.policy import MegatronPolicy
    from flywheel.trainer.policy_interface import ParallelConfig, PolicyConfig

    policy = MegatronPolicy(
        PolicyConfig(
            backend="megatron", model=str(folder), bf16=bf16, parallel=ParallelConfig(tensor=tensor, expert=expert)
        )
    )
    if compiled:
        compile_transformer_layers(policy.model)
    return policy


def measure_layout(
    folder: Path, size: dict, tensor: int, expert: int, device, bf16: bool, compiled: bool, warmup: int, steps: int
) -> dict:
    from megatron.core import parallel_state as ps

    policy = build_policy(folder, tensor, expert, bf16, compiled)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    share = size["batch"] // dp
    batches = [tuple(t[dp_rank * share : (dp_rank + 1) * share].to(device) for t in b) for b in global_batches(size)]
    params = list(policy.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=device.type == "cuda")

    def loss_of(i):
        ids, pos, targets = batches[i % len(batches)]
        return -policy.forward_logprobs(ids, pos, targets).mean()  # the mean NLL of this rank's share

    def step(i=0):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(i)
        loss.backward()
        policy.finalize_grads()  # TP partial grads, mean over DP replicas, experts over expert-DP
        opt.step()

    loss0 = loss_of(0).detach()
    dist.all_reduce(loss0, group=ps.get_data_parallel_group())  # every share has the same size: mean of means
    loss0 = float(loss0) / dp
    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    counter = iter(range(10**9))
    elapsed = torch.tensor(_timed(lambda: step(next(counter)), steps, device), dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank ends
    peak = torch.tensor(
        torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0, dtype=torch.float64
    )
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    tokens = size["batch"] * size["seq"] * steps
    out = {
        "initial_loss": loss0,
        "ms_per_step": 1000 * float(elapsed) / steps,
        "tokens_per_s": tokens / float(elapsed),
        "peak_mem_gib_max_over_ranks": float(peak),
        "gpus": dist.get_world_size(),
        "tensor": tensor,
        "expert": expert,
        "data": dp,
    }
    policy = opt = batches = None  # drop the references (a `del` would unbind names the closures read)
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", choices=["single", "multi"], required=True)
    parser.add_argument("--single", type=Path, help="phase 1's JSON (phase multi: the one-GPU baseline)")
    parser.add_argument("--sizes", nargs="+", default=None, choices=list(SIZES))
    parser.add_argument("--toy", action="store_true", help="toy size on the CPU (gloo, fp32)")
    parser.add_argument("--bf16", action="store_true", help="bf16 on the CPU too (the GPU always runs bf16)")
    parser.add_argument("--eager-only", action="store_true", help="skip the compiled variants")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from flywheel.trainer.megatron.parallel import device as current_device
    from flywheel.trainer.megatron.parallel import init_parallel

    init_parallel(None)  # torch.distributed (torchrun's world, or a world of one)
    device = current_device()
    bf16 = device.type == "cuda" or args.bf16
    sizes = args.sizes or (["toy"] if args.toy else ["issue", "large"])
    rank, world = dist.get_rank(), dist.get_world_size()
    single = json.loads(args.single.read_text()) if args.single else {}
    flat = dict(single) if args.phase == "multi" else {}
    variants = ["eager"] if args.eager_only else ["eager", "compiled"]
    # one folder all ranks read: rank 0 names it (a world on one host)
    holder = [
        tempfile.mkdtemp(prefix="flywheel-bench-", dir=os.environ.get("FLYWHEEL_BENCH_TMP")) if rank == 0 else None
    ]
    dist.broadcast_object_list(holder, src=0)
    tmp = holder[0]
    try:
        for size_name in sizes:
            size = SIZES[size_name]
            for moe in (False, True):
                tag = f"{size_name}_{'moe' if moe else 'dense'}"
                folder = Path(tmp) / tag
                if rank == 0:
                    save_hf_model(size, moe, folder, torch.bfloat16 if bf16 else torch.float32)
                dist.barrier()
                for layout, (tensor, expert, kind) in LAYOUTS.items():
                    if (layout == "single") != (args.phase == "single") or kind not in (
                        "both",
                        "moe" if moe else "dense",
                    ):
                        continue
                    for variant in variants:
                        key = f"{tag}_{layout}_{variant}"
                        t0 = time.time()
                        try:
                            r = measure_layout(
                                folder,
                                size,
                                tensor,
                                expert,
                                device,
                                bf16,
                                variant == "compiled",
                                args.warmup,
                                args.steps,
                            )
                        except Exception as exc:  # one failing layout must not lose the others...
                            if world > 1:  # ...but a rank that left a collective hangs the others: stop
                                raise
                            traceback.print_exc()
                            flat[f"{key}_error"] = f"{type(exc).__name__}: {exc}"[:300]
                            continue
                        flat.update({f"{key}_{k}": v for k, v in r.items()})
                        base = flat.get(f"{tag}_single_{variant}_tokens_per_s")
                        if layout != "single" and base:
                            flat[f"{key}_scaling_efficiency"] = r["tokens_per_s"] / (world * base)
                            flat[f"{key}_vs_single_{variant}_ratio"] = r["tokens_per_s"] / base
                            flat[f"{key}_loss0_minus_single_loss0"] = (
                                r["initial_loss"] - flat[f"{tag}_single_{variant}_initial_loss"]
                            )
                        if rank == 0:
                            print(
                                f"[{tag}] {layout}/{variant:<9} {r['ms_per_step']:8.1f} ms/step "
                                f"{r['tokens_per_s']:>11,.0f} tok/s loss0 {r['initial_loss']:.5f} "
                                f"mem {r['peak_mem_gib_max_over_ranks']:.1f} GiB ({time.time() - t0:.0f}s)",
                                flush=True,
                            )
                        if rank == 0:
                            args.out.parent.mkdir(parents=True, exist_ok=True)
                            args.out.write_text(json.dumps(flat, indent=1))  # partial results survive a timeout
                dist.barrier()
    finally:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    if rank == 0:
        args.out.write_text(json.dumps(flat, indent=1))
        print(f"wrote {args.out}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
