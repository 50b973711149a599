"""Training objectives as pure functions of per-token log-probabilities.

Conventions shared by every function here:
    logprobs, mask, ... are [B, T] tensors in *target* alignment (position t scores the token
    predicted at t, see trainer/policy_interface.py); `mask` is 1.0 where a token counts, 0.0 elsewhere.
    `seq_index` [B, T] long gives each counted token the index of its sequence in the batch
    (packed rows hold several sequences); it is ignored where mask == 0.
    Normalisers (`num_tokens`, `num_seqs`) default to this batch's counts; the recipe passes the
    whole optimizer step's counts so that gradient accumulation over micro-batches sums to exactly
    the full-batch loss.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Aggregation = Literal["token-mean", "seq-mean", "dr-grpo"]


# ---------------------------------------------------------------- CPT / SFT


def nll_loss(logprobs: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Next-token negative log-likelihood, mean over counted tokens.

        L = - sum_t mask_t * logp_t / N,   N = num_tokens or sum_t mask_t

    CPT counts every token of a document but its first; SFT counts assistant tokens only.
    """
    n = float(mask.sum()) if num_tokens is None else float(num_tokens)
    return -(logprobs * mask).sum() / max(n, 1.0)


def sequence_sums(values: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor, num_seqs: int) -> torch.Tensor:
    """Per-sequence sum of masked values: out[s] = sum_{t: seq_index_t = s} mask_t * values_t  ->  [num_seqs]."""
    flat_mask = mask.reshape(-1) > 0
    out = torch.zeros(num_seqs, dtype=values.dtype, device=values.device)
    return out.index_add(0, seq_index.reshape(-1)[flat_mask], values.reshape(-1)[flat_mask])


# ---------------------------------------------------------------- DPO


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO (Rafailov et al. 2023) on summed response log-probs, one entry per pair.

        r_c = beta * (log pi(y_c|x) - log ref(y_c|x)),   r_r = beta * (log pi(y_r|x) - log ref(y_r|x))
        L   = mean( -log sigmoid(r_c - r_r) )

    Returns (loss, margins = r_c - r_r per pair (detached), accuracy = mean(margins > 0)).
    """
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    logits = chosen_reward - rejected_reward
    loss = -F.logsigmoid(logits).mean()
    margins = logits.detach()
    return loss, margins, (margins > 0).float().mean()


# ---------------------------------------------------------------- GRPO


def group_advantages(
    rewards: torch.Tensor, group_ids: list[str], scale_by_std: bool = True, eps: float = 1e-6
) -> tuple[torch.Tensor, int]:
    """Group-normalised advantages (Shao et al. 2024), one per completion.

        A_i = (r_i - mean_g) / (std_g + eps)     (scale_by_std=True, GRPO; std with Bessel's correction)
        A_i =  r_i - mean_g                      (scale_by_std=False, Dr.GRPO)

    where g is the group of completion i (same prompt). A group whose rewards are all equal (or a
    group of one) carries no signal: its advantages are exactly 0 and it is counted.
    Returns (advantages [N] float32, number of zero-variance groups).
    """
    if rewards.numel() != len(group_ids):
        raise ValueError(f"{rewards.numel()} rewards for {len(group_ids)} group ids")
    rewards = rewards.float()
    out = torch.zeros_like(rewards)
    members: dict[str, list[int]] = {}
    for i, g in enumerate(group_ids):
        members.setdefault(g, []).append(i)
    zero_variance = 0
    for idx in members.values():
        r = rewards[idx]
        if len(idx) < 2 or float(r.max() - r.min()) == 0.0:
            zero_variance += 1
            continue
        centred = r - r.mean()
        out[idx] = centred / (r.std() + eps) if scale_by_std else centred
    return out, zero_variance


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref) (Schulman 2020): exp(q - p) - (q - p) - 1,
    q = log ref, p = log pi. >= 0."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    seq_index: torch.Tensor,
    mode: Aggregation,
    num_tokens: float | None = None,
    num_seqs: int | None = None,
    seq_lengths: torch.Tensor | None = None,
    constant: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to a scalar.

        token-mean (DAPO):    sum_{i,t} l_it / sum_i |o_i|
        seq-mean   (GRPO):    (1/G) sum_i (1/|o_i|) sum_t l_it
        dr-grpo    (Dr.GRPO): sum_{i,t} l_it / (G * C),  C a constant (e.g. max completion tokens)

    For seq-mean, `seq_lengths[s]` (|o_s| over the whole sequence, default: counted in this batch) and
    `num_seqs` (G) let a sequence's tokens be split across micro-batches without changing the result.
    """
    if mode == "token-mean":
        return (per_token * mask).sum() / max(float(mask.sum()) if num_tokens is None else float(num_tokens), 1.0)
    n_seq = int(seq_index[mask > 0].max()) + 1 if num_seqs is None and bool((mask > 0).any()) else (num_seqs or 1)
    if mode == "seq-mean":
        if seq_lengths is None:
            seq_lengths = sequence_sums(torch.ones_like(per_token), mask, seq_index, n_seq)
        sums = sequence_sums(per_token, mask, seq_index, n_seq)
        return (sums / seq_lengths.clamp(min=1)).sum() / n_seq
    if mode == "dr-grpo":
        if constant is None:
            raise ValueError("dr-grpo aggregation needs a constant (max completion tokens)")
        return (per_token * mask).sum() / (n_seq * constant)
    raise ValueError(f"unknown aggregation {mode!r} (token-mean, seq-mean, dr-grpo)")


PolicyLoss = Literal["grpo", "gspo", "cispo"]


def grpo_loss(
    logprobs: torch.Tensor,
    behavior_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    seq_index: torch.Tensor,
    *,
    loss_type: PolicyLoss = "grpo",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    proximal_logprobs: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    aggregation: Aggregation = "token-mean",
    **normalisers,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy-gradient loss (GRPO, GSPO or CISPO) with an off-policy correction and optional KL.

    Per token, with p = logprobs (with grad), b = behaviour logprobs from the rollout record,
    A = advantages broadcast to the completion's tokens, anchor = proximal_logprobs if given else b,
    r = exp(p - anchor), and w, m the correction's weight and keep-mask (trainer/off_policy.py; 1 if None):
        grpo  (token-level PPO):   l_t = -min(r_t A, clip(r_t, 1 - clip_low, 1 + clip_high) A)
        gspo  (Zheng et al. 2025): s = exp(mean_{t in seq} (p_t - anchor_t)), one ratio per sequence;
                                   l_t = -min(s A, clip(s, 1 - clip_low, 1 + clip_high) A) on every token of it
        cispo (MiniMax-M1 2025):   l_t = -sg(min(r_t, 1 + clip_high)) A p_t: the IS weight is clipped and
                                   detached, so every token keeps a gradient (none is zeroed by clipping)
        loss  = aggregate( m_t * w_t * l_t  +  kl_coef * k3(p, ref) )

    Without a proximal pass the ratio is taken directly against the behaviour policy (the sampler's
    processed logprobs). With one (the learner's own logprobs before this step) the ratio stays near 1
    and the server/learner mismatch moves into w and m, which bound (truncate) or drop (mask) what
    stale or mismatched rollouts would otherwise add. clip_high > clip_low is DAPO's clip-higher.
    Returns (loss, metrics): clip_fraction (tokens whose clip is active), ratio_mean, kl, tis_weight_mean.
    """
    anchor = behavior_logprobs if proximal_logprobs is None else proximal_logprobs
    log_ratio = logprobs - anchor
    m = mask > 0
    if loss_type == "gspo":
        n_seq = int(seq_index[m].max()) + 1 if bool(m.any()) else 1
        lengths = sequence_sums(torch.ones_like(log_ratio), mask, seq_index, n_seq).clamp(min=1)
        seq_ratio = torch.exp(sequence_sums(log_ratio, mask, seq_index, n_seq) / lengths)
        ratio = seq_ratio[seq_index.clamp(min=0)]
    else:
        ratio = torch.exp(log_ratio)
    if loss_type == "cispo":
        capped = ratio.clamp(max=1.0 + clip_high).detach()
        per_token = -capped * advantages * logprobs
        clipped_tokens = ratio.detach() > 1.0 + clip_high
    elif loss_type in ("grpo", "gspo"):
        bounded = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
        surrogate = torch.minimum(ratio * advantages, bounded * advantages)
        per_token = -surrogate
        clipped_tokens = surrogate != ratio * advantages  # the clipped branch was chosen
    else:
        raise ValueError(f"unknown policy loss {loss_type!r} (grpo, gspo, cispo)")
    weight = torch.ones_like(per_token) if weight is None else weight.detach()
    keep = torch.ones_like(per_token) if keep is None else keep.detach()
    per_token = keep * weight * per_token
    kl = torch.zeros_like(per_token)
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + kl_coef * kl
    loss = aggregate(per_token, mask, seq_index, aggregation, **normalisers)
    n = max(int(m.sum()), 1)
    with torch.no_grad():
        metrics = {
            "clip_fraction": float((clipped_tokens & m).sum()) / n,
            "ratio_mean": float(ratio[m].sum()) / n,
            "kl": float(kl[m].sum()) / n,
            "tis_weight_mean": float(weight[m].sum()) / n,
        }
    return loss, metrics
