"""The training recipe: a plain loop over small pieces.

policy    = build_policy(...)                    trainer/backend.py (transformers | megatron)
source    = FileSource | QueueSource             trainer/sources.py, trainer/queue_source.py
per step:   data = source.next_step(step)        samples of this step (stale rollouts dropped)
            *_backward(policy, data)             trainer/objectives.py: loss + backward per micro-batch
            clip, optimizer.step, schedule.step
            checkpoint every N steps and on push steps, then ack   trainer/checkpoint.py (records acked once durable)
            push weights every K steps           trainer/push.py (version = last pushed + 1, after its checkpoint)
            log metrics                          trainer/metrics.py (JSONL + TensorBoard) and the progress bar
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from flywheel.server.errors import UserError
from flywheel.trainer.backend import build_policy
from flywheel.trainer.checkpoint import (
    TrainState,
    check_resume_layout,
    latest_checkpoint,
    load_trainer_state,
    save_checkpoint,
)
from flywheel.trainer.config import TrainConfig
from flywheel.trainer.metrics import MetricsLog
from flywheel.trainer.objectives import dpo_backward, grpo_backward, nll_backward, pair_logprob_sums
from flywheel.trainer.optim import build_optimizer
from flywheel.trainer.policy_interface import resolve_model_path
from flywheel.trainer.push import WeightPusher
from flywheel.trainer.ranks import is_main_rank
from flywheel.trainer.sources import FileSource


def make_source(config: TrainConfig, tokenizer):
    if config.queue is not None:
        from flywheel.trainer.queue_source import QueueSource

        return RankZeroSource(QueueSource(config) if is_main_rank() else None)
    return FileSource(config, tokenizer)  # a pure function of (step, seed): every rank computes the same batch


class RankZeroSource:
    """A live source (the queue) read by rank 0 only; every other rank gets rank 0's StepData.

    Under torchrun every model-parallel rank must train the same records: one consumer reading the
    queue per rank would hand each rank different records (and ack them from the wrong process).
    Rank 0 reads, acks and keeps deliveries alive; the others receive the step's samples and ids.
    """

    def __init__(self, source):
        self.source = source
        self.items: list = []

    def next_step(self, step: int, state: TrainState):
        from flywheel.trainer.sources import StepData

        dist = torch.distributed
        data = self.source.next_step(step, state) if self.source is not None else None
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return data
        box = [None if data is None else StepData(data.items, data.indices, data.record_ids, [], data.info)]
        dist.broadcast_object_list(box, src=0)
        if data is not None:
            return data  # rank 0 keeps its deliveries (acks)
        return box[0]

    def ack_durable(self, acks: list) -> None:
        if self.source is not None:
            self.source.ack_durable(acks)

    def keep_alive(self, acks: list) -> None:
        if self.source is not None:
            self.source.keep_alive(acks)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


def dpo_reference(policy, pairs, config: TrainConfig, pad_id: int) -> torch.Tensor:
    """Summed reference logprobs of every pair, computed once from the starting weights and cached in run_dir.

    On resume the policy has already moved, so the cache is the only valid reference: it must exist.
    """
    path = Path(config.run_dir) / "dpo_reference.pt"
    if path.exists():
        cached = torch.load(path)
        if cached.shape[0] == len(pairs):
            return cached
    if config.resume and latest_checkpoint(config.run_dir) is not None:
        raise UserError(f"{path} is missing or stale; cannot resume DPO without its reference")
    policy.train(False)
    reference = pair_logprob_sums(policy, pairs, config, pad_id)
    policy.train(True)
    if is_main_rank():
        torch.save(reference, path)
    return reference


def prepare_run_dir(config: TrainConfig) -> Path | None:
    """Return the checkpoint to resume from (None: fresh start); refuse to silently overwrite a run."""
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None and not config.resume:
        raise UserError(f"{run_dir} already holds checkpoints; pass --resume or use a new --run-dir")
    (run_dir / "train_config.json").write_text(config.model_dump_json(indent=2))
    return checkpoint


def train(config: TrainConfig) -> TrainState:
    checkpoint = prepare_run_dir(config)
    layout = {
        "backend": config.backend,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        **config.parallel.model_dump(),
    }
    if checkpoint is not None:
        check_resume_layout(checkpoint, layout)  # before anything is built
    torch.manual_seed(config.seed)
    policy = build_policy(config.policy_config(checkpoint))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    optimizer, scheduler = build_optimizer(policy.parameters(), config)
    state = load_trainer_state(checkpoint, optimizer, scheduler) if checkpoint else TrainState()

    source = make_source(config, tokenizer)
    reference_sums = dpo_reference(policy, source.items, config, pad_id) if config.objective == "dpo" else None
    reference_policy = None
    if config.objective == "grpo" and config.grpo.kl_coef > 0:
        reference_policy = build_policy(config.policy_config())  # the starting weights, frozen
        reference_policy.train(False)
        for p in reference_policy.parameters():
            p.requires_grad_(False)

    pusher = WeightPusher(config)
    log = MetricsLog(config.run_dir, enabled=is_main_rank())
    bar = tqdm(total=config.max_steps, initial=state.step, desc=f"train {config.objective}", disable=not is_main_rank())
    pending_ack: list = []
    last_step = config.max_steps if config.stop_after is None else min(config.max_steps, state.step + config.stop_after)
    try:
        for step in range(state.step, last_step):
            start = time.perf_counter()
            data = source.next_step(step, state)
            metrics = dict(data.info)
            if data.items:
                if config.objective in ("cpt", "sft"):
                    metrics |= nll_backward(policy, data.items, config, pad_id)
                elif config.objective == "dpo":
                    metrics |= dpo_backward(policy, data.items, reference_sums[data.indices], config, pad_id)
                else:
                    metrics |= grpo_backward(policy, data.items, config, pad_id, reference_policy)
                policy.finalize_grads()
                metrics["grad_norm"] = policy.clip_grad_norm(config.grad_clip)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            metrics["lr"] = scheduler.get_last_lr()[0]
            scheduler.step()

            state.step = step + 1
            state.dropped_stale += metrics.get("dropped_stale", 0)
            state.tokens_trained += metrics.get("tokens", 0)
            state.remember(data.record_ids)
            pending_ack += data.acks
            source.keep_alive(pending_ack)
            # Durable before visible: a push step checkpoints first, holding the version it is about to
            # publish, so every version a server serves can be recovered (a resume pushes it again).
            push_now = pusher.due(state.step)
            if push_now:
                state.pushed_version = pusher.next_version(state.pushed_version)
            if push_now or (config.save_every and state.step % config.save_every == 0) or state.step == last_step:
                save_checkpoint(
                    config.run_dir, policy, optimizer, scheduler, state, keep=config.keep_checkpoints, layout=layout
                )
                source.ack_durable(pending_ack)  # only now: the step that used them survives a crash
                pending_ack = []
            if push_now:
                metrics |= pusher.push(policy, state.pushed_version, state.step)
            metrics["step_s"] = time.perf_counter() - start
            metrics["tokens_per_s"] = metrics.get("tokens", 0) / metrics["step_s"]
            if state.step % config.log_every == 0 or state.step == last_step:
                log.log(state.step, metrics)
            bar.set_postfix(
                {k: f"{metrics[k]:.4g}" for k in ("loss", "reward_mean", "kl", "tokens_per_s") if k in metrics}
            )
            bar.update(1)
    finally:
        bar.close()
        log.close()
        source.close()
        pusher.close()
    return state
