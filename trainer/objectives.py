"""One optimizer step's forward/backward per objective, accumulated over token-budget micro-batches.

Each function takes the step's samples, splits them into micro-batches of at most
`micro_batch_tokens`, and calls backward on each micro-batch's share of the step loss (normalised
by step-wide counts), so the accumulated gradient equals the gradient of the full-batch loss.
They return the step's metrics; the optimizer step itself is the recipe's (trainer/train.py).
"""

from __future__ import annotations

import torch

from flywheel.trainer.config import TrainConfig
from flywheel.trainer.data import PreferencePair, Sample, collate, micro_batches
from flywheel.trainer.losses import dpo_loss, grpo_loss, nll_loss, sequence_sums
from flywheel.trainer.off_policy import MismatchStats, correction


def _device(policy) -> torch.device:
    return next(iter(policy.parameters())).device


def _logprobs(policy, batch, temperature: float = 1.0) -> torch.Tensor:
    return policy.forward_logprobs(batch.input_ids, batch.position_ids, batch.targets, temperature=temperature)


def my_share(policy, groups: list) -> list:
    """This data-parallel rank's micro-batches: every dp-th one (all of them when the policy does not
    shard data). Losses stay normalised by step-wide counts, so the policy's finalize_grads sums
    the shards' gradients into the full-batch gradient."""
    rank, size = getattr(policy, "data_shard", (0, 1))
    return groups[rank::size]


def summed_over_shards(policy, values: dict) -> dict:
    """Metrics that are sums over this rank's micro-batches, summed over the data shards."""
    reduce = getattr(policy, "sum_over_data_shards", None)
    return reduce(values) if reduce is not None and getattr(policy, "data_shard", (0, 1))[1] > 1 else values


def counted_tokens(sample: Sample) -> int:
    return sum(sample.loss_mask[1:])


def nll_backward(policy, samples: list[Sample], config: TrainConfig, pad_id: int) -> dict:
    """CPT / SFT: token-mean NLL over every counted token of the step."""
    total = sum(counted_tokens(s) for s in samples)
    loss_sum = 0.0
    for group in my_share(policy, list(micro_batches(samples, config.micro_batch_tokens))):
        batch = collate(group, pad_id, pack=config.pack).to(_device(policy))
        loss = nll_loss(_logprobs(policy, batch), batch.mask, num_tokens=total)
        loss.backward()
        loss_sum += float(loss.detach())
    return {**summed_over_shards(policy, {"loss": loss_sum}), "tokens": total}


def pair_logprob_sums(policy, pairs: list[PreferencePair], config: TrainConfig, pad_id: int) -> torch.Tensor:
    """No-grad summed response logprobs, [n_pairs, 2] (chosen, rejected): the cached DPO reference."""
    out = []
    with torch.no_grad():
        for group in micro_batches(pairs, config.micro_batch_tokens, size=_pair_size):
            out.append(_pair_sums(policy, group, pad_id, config.pack).cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


def _pair_size(pair: PreferencePair) -> int:
    return len(pair.chosen.tokens) + len(pair.rejected.tokens)


def _pair_sums(policy, pairs: list[PreferencePair], pad_id: int, pack: bool) -> torch.Tensor:
    flat = [s for p in pairs for s in (p.chosen, p.rejected)]
    batch = collate(flat, pad_id, pack=pack).to(_device(policy))
    sums = sequence_sums(_logprobs(policy, batch), batch.mask, batch.seq_index, len(flat))
    return sums.view(len(pairs), 2)


def dpo_backward(
    policy, pairs: list[PreferencePair], reference: torch.Tensor, config: TrainConfig, pad_id: int
) -> dict:
    """DPO: mean sigmoid loss over the step's pairs; `reference` [n_pairs, 2] from pair_logprob_sums."""
    n = len(pairs)
    groups, start = [], 0
    for group in micro_batches(pairs, config.micro_batch_tokens, size=_pair_size):
        groups.append((start, group))
        start += len(group)
    loss_sum, margin_sum, correct = 0.0, 0.0, 0.0
    for start, group in my_share(policy, groups):
        sums = _pair_sums(policy, group, pad_id, config.pack)
        ref = reference[start : start + len(group)].to(sums.device)
        loss, margin, _ = dpo_loss(sums[:, 0], sums[:, 1], ref[:, 0], ref[:, 1], beta=config.dpo.beta)
        (loss * len(group) / n).backward()
        loss_sum += float(loss.detach()) * len(group) / n
        margin_sum += float(margin.sum())
        correct += float((margin > 0).sum())
    totals = summed_over_shards(policy, {"loss": loss_sum, "margin": margin_sum, "correct": correct})
    tokens = sum(counted_tokens(p.chosen) + counted_tokens(p.rejected) for p in pairs)
    return {
        "loss": totals["loss"],
        "margin_mean": totals["margin"] / n,
        "accuracy": totals["correct"] / n,
        "tokens": tokens,
    }


def grpo_backward(policy, samples: list[Sample], config: TrainConfig, pad_id: int, reference=None) -> dict:
    """GRPO / GSPO / CISPO on rollouts whose advantages are already set, with the configured off-policy correction.

    The learner's pre-step logprobs are this step's own forward, detached: the weights do not change
    between the micro-batches of one optimizer step, so no separate no-grad pass is needed. They are
    the correction's anchor and, against the records' behaviour logprobs, the mismatch metrics.
    """
    g = config.grpo
    lengths = torch.tensor([float(counted_tokens(s)) for s in samples], device=_device(policy))
    norm = dict(
        num_tokens=float(lengths.sum()), num_seqs=len(samples), seq_lengths=lengths, constant=float(g.dr_grpo_constant)
    )
    clip_low, clip_high = g.clip_range()
    loss_sum, sums = 0.0, {"clip_fraction": 0.0, "ratio_mean": 0.0, "kl": 0.0, "tis_weight_mean": 0.0}
    mismatch = MismatchStats()
    groups, first = [], 0
    for group in micro_batches(samples, config.micro_batch_tokens):
        groups.append((first, group))  # first: the group's index into the step (seq_lengths)
        first += len(group)
    for first, group in my_share(policy, groups):
        batch = collate(group, pad_id, pack=config.pack, first_index=first).to(_device(policy))
        ref = None
        if reference is not None and g.kl_coef > 0:
            with torch.no_grad():
                ref = _logprobs(reference, batch, g.temperature)
        logprobs = _logprobs(policy, batch, g.temperature)
        learner = logprobs.detach()
        corr = None
        if g.corrects:
            corr = correction(
                learner,
                batch.behavior_logprobs,
                batch.mask,
                batch.seq_index,
                tis_cap=g.tis_cap,
                seq_is_cap=g.seq_is_cap,
                token_mask_k=g.token_mask_k,
                geo_mask_k=g.geo_mask_k,
            )
        mismatch.add(learner, batch.behavior_logprobs, batch.mask, batch.seq_index, batch.lag, corr)
        loss, metrics = grpo_loss(
            logprobs,
            batch.behavior_logprobs,
            batch.advantages,
            batch.mask,
            batch.seq_index,
            loss_type=g.loss,
            clip_low=clip_low,
            clip_high=clip_high,
            proximal_logprobs=learner if corr is not None else None,
            weight=None if corr is None else corr.weight,
            keep=None if corr is None else corr.keep,
            ref_logprobs=ref,
            kl_coef=g.kl_coef,
            aggregation=g.aggregation,
            **norm,
        )
        loss.backward()
        loss_sum += float(loss.detach())
        share = batch.num_tokens / max(norm["num_tokens"], 1.0)  # token-weighted average of the metrics
        for k in sums:
            sums[k] += metrics[k] * share
    # mismatch metrics are this rank's (their keys depend on the lags present, so they are not all-reduced)
    return {
        **summed_over_shards(policy, {"loss": loss_sum, **sums}),
        **mismatch.metrics(),
        "tokens": int(norm["num_tokens"]),
    }
