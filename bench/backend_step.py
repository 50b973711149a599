"""One GRPO optimizer step, megatron-core vs transformers, on the bundled SmolLM2-135M-Instruct (fp32; CPU
unless CUDA is visible: CUDA_VISIBLE_DEVICES= forces the CPU).

Issue 17: "measure a GRPO step of both backends on the bundled SmolLM2-135M; if megatron is within
10% of transformers, make it the default learner". Both backends are built from the same HF folder
(world size 1; megatron over gloo) and train the same rollouts with the same TrainConfig: the
step is what trainer/train.py does per step (rollout_step -> grpo_backward -> finalize_grads ->
clip -> AdamW step). The shape is `flywheel up`'s default step (16 completions of up to 96
tokens, groups of 8, ~40-token prompts). Steps alternate between the backends (A, B, A, B, ...),
so load from other processes on the machine lands on both alike; the median is reported.

  python bench/backend_step.py                  # SmolLM2-135M, 1 warm-up + 5 timed steps each
  python bench/backend_step.py --model tiny-qwen3 --steps 2   # smoke run
Writes bench/results/backend_step.json (flat keys; megatron_vs_transformers_step_ratio = megatron
seconds / transformers seconds, median wall time, below 1 = megatron faster; *_cpu_ratio: the same in
process CPU seconds, which other load on a shared machine disturbs less).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rollouts(vocab: int, completions: int, group_size: int, prompt_len: int, max_tokens: int, seed: int):
    """GRPO records of the loop's shape: random ids, mixed rewards in every group, lengths up to max_tokens
    (behaviour logprobs are placeholders until main() sets the policy's own)."""
    from flywheel.sampler.record import RolloutRecord

    rng = random.Random(seed)
    out = []
    for g in range(completions // group_size):
        prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
        for i in range(group_size):
            n = rng.randint(max_tokens // 2, max_tokens)
            out.append(
                RolloutRecord(
                    group_id=f"g{g}",
                    prompt_token_ids=prompt,
                    completion_token_ids=[rng.randrange(vocab) for _ in range(n)],
                    behavior_logprobs=[-1.0] * n,
                    reward=float(i % 2),
                )
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per backend (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "backend_step.json")
    args = parser.parse_args()

    import megatron.core
    import torch
    import transformers

    from flywheel.server.models import resolve_model
    from flywheel.trainer.backend import build_policy
    from flywheel.trainer.checkpoint import TrainState
    from flywheel.trainer.config import TrainConfig
    from flywheel.trainer.objectives import grpo_backward
    from flywheel.trainer.optim import build_optimizer
    from flywheel.trainer.policy_interface import IGNORE
    from flywheel.trainer.sources import rollout_step

    path = resolve_model(args.model)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    records = rollouts(vocab, args.batch_size, args.group_size, args.prompt_len, args.max_tokens, seed=0)
    seq = args.prompt_len + args.max_tokens
    backends = ("transformers", "megatron")
    runs = {}
    for backend in backends:
        config = TrainConfig(
            objective="grpo",
            backend=backend,
            model=str(path),
            data=["unused"],
            run_dir=Path("/tmp/unused"),
            batch_size=args.batch_size,
            max_seq_len=seq,
            micro_batch_tokens=4 * seq,
            lr=1e-6,
            grpo={"group_size": args.group_size},
        )
        torch.manual_seed(0)
        policy = build_policy(config.policy_config())
        optimizer, scheduler = build_optimizer(policy.parameters(), config)
        runs[backend] = (config, policy, optimizer, scheduler)

    # behaviour logprobs = the starting policy's own (as if sampled by the served weights): on-policy
    # ratios, so no token is clipped or masked away and the step does the loop's full work
    _, hf_policy, _, _ = runs["transformers"]
    with torch.no_grad():
        for r in records:
            ids = torch.tensor([r.prompt_token_ids + r.completion_token_ids])
            targets = torch.cat([ids[:, 1:], torch.full((1, 1), IGNORE)], 1)
            logprobs = hf_policy.forward_logprobs(ids, torch.arange(ids.shape[1])[None], targets)
            r.behavior_logprobs = logprobs[0, len(r.prompt_token_ids) - 1 : -1].tolist()

    def step(backend: str) -> tuple[float, float, float]:
        config, policy, optimizer, scheduler = runs[backend]
        start, cpu_start = time.perf_counter(), time.process_time()
        data = rollout_step(records, config, TrainState())
        metrics = grpo_backward(policy, data.items, config, pad_id=0)
        policy.finalize_grads()
        policy.clip_grad_norm(config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start, time.process_time() - cpu_start, metrics["loss"]

    times: dict[str, list[float]] = {b: [] for b in backends}
    cpu_times: dict[str, list[float]] = {b: [] for b in backends}
    losses: dict[str, list[float]] = {b: [] for b in backends}
    for i in range(args.steps + 1):  # step 0 warms up (allocator, megatron's first-call setup)
        for backend in backends if i % 2 == 0 else reversed(backends):
            seconds, cpu_seconds, loss = step(backend)
            print(f"step {i} {backend}: {seconds:.2f} s (cpu {cpu_seconds:.2f} s) loss {loss:.5f}", flush=True)
            losses[backend].append(loss)
            if i > 0:
                times[backend].append(seconds)
                cpu_times[backend].append(cpu_seconds)

    tokens = sum(len(r.prompt_token_ids) + len(r.completion_token_ids) for r in records)
    results = {
        "command": " ".join(["backend_step.py", *sys.argv[1:]]),
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "dtype": "float32",
        "python": platform.python_version(),
        "versions": (
            f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"megatron-core {megatron.core.__version__}"
        ),
        "model": args.model,
        "batch_size": args.batch_size,
        "group_size": args.group_size,
        "max_tokens": args.max_tokens,
        "tokens_per_step": tokens,
        "timed_steps": args.steps,
    }
    for backend in backends:
        results[f"{backend}_step_s_median"] = round(statistics.median(times[backend]), 4)
        results[f"{backend}_step_s_all"] = [round(t, 4) for t in times[backend]]
        results[f"{backend}_tokens_per_s"] = round(tokens / statistics.median(times[backend]), 1)
        results[f"{backend}_cpu_s_median"] = round(statistics.median(cpu_times[backend]), 4)
        results[f"{backend}_first_loss"] = losses[backend][0]
    results["first_loss_abs_diff"] = abs(losses["megatron"][0] - losses["transformers"][0])
    results["megatron_vs_transformers_step_ratio"] = round(
        results["megatron_step_s_median"] / results["transformers_step_s_median"], 4
    )
    # process CPU seconds (every thread): less sensitive than wall time to other load on a shared machine
    results["megatron_vs_transformers_cpu_ratio"] = round(
        results["megatron_cpu_s_median"] / results["transformers_cpu_s_median"], 4
    )
    # each round runs both backends back to back: the median of the per-round ratios cancels slow drifts
    paired = [m / t for m, t in zip(times["megatron"], times["transformers"], strict=True)]
    results["megatron_vs_transformers_paired_ratio"] = round(statistics.median(paired), 4)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
