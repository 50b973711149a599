"""Off-policy corrections between the server's behaviour logprobs and the learner's, and metrics of their mismatch.

The server samples with its own kernels, precision and (in the async loop) possibly older weights,
so the learner's log-probability of a sampled token, p, is not the server's, b. Per counted token
d = p - b is the log importance ratio learner/server. With a correction configured the policy loss
anchors its ratio at the learner's own pre-step logprobs and this module decides, per token:

    weight   token TIS:  w_t = min(exp(d_t), tis_cap)                       (truncated IS, Yao et al. 2025)
             sequence IS: w_t = min(exp(sum_{t in s} d_t), seq_is_cap)     (every token of sequence s; MIS)
    keep     token mask:  d_t outside [-log k, log k] -> token dropped      (IcePop-style, k = token_mask_k)
             geo mask:    mean_{t in s} d_t outside [-log k, log k] -> sequence s dropped   (k = geo_mask_k)

`MismatchStats` accumulates d over an optimizer step's micro-batches and reports |d| mean/p99/max,
the sequence log-ratio, KL(server || learner) (k3 estimate from the server's own samples) and the
fractions the correction truncated or masked, overall and per policy-version lag of the rollouts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flywheel.trainer.losses import sequence_sums


@dataclass
class Correction:
    """Per-token outcome of the configured correction, all [B, T] and detached."""

    weight: torch.Tensor  # importance weight multiplying the token's loss (1 without IS)
    keep: torch.Tensor  # 1.0 kept, 0.0 masked by a token or sequence mask
    truncated: torch.Tensor  # bool: the IS weight was cut at its cap


def _per_sequence(values: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor) -> torch.Tensor:
    """Per-token view of a per-sequence quantity: values[seq_index] where counted, 0 elsewhere ([B, T])."""
    return values[seq_index.clamp(min=0)] * (mask > 0)


def correction(
    learner: torch.Tensor,
    behavior: torch.Tensor,
    mask: torch.Tensor,
    seq_index: torch.Tensor,
    *,
    tis_cap: float | None = None,
    seq_is_cap: float | None = None,
    token_mask_k: float | None = None,
    geo_mask_k: float | None = None,
) -> Correction:
    """The weights and masks of the chosen correction (see the module doc); `learner` is detached here."""
    if tis_cap is not None and seq_is_cap is not None:
        raise ValueError("token-level TIS (tis_cap) and sequence-level IS (seq_is_cap) are alternatives; set one")
    counted = mask > 0
    d = (learner.detach() - behavior) * counted
    weight = torch.ones_like(d)
    truncated = torch.zeros_like(counted)
    keep = counted.float()
    n_seq = int(seq_index[counted].max()) + 1 if bool(counted.any()) else 1
    seq_sum = sequence_sums(d, mask, seq_index, n_seq)
    if tis_cap is not None:
        raw = torch.exp(d)
        weight, truncated = raw.clamp(max=tis_cap), (raw > tis_cap) & counted
    if seq_is_cap is not None:
        raw = torch.exp(seq_sum)
        weight = _per_sequence(raw.clamp(max=seq_is_cap), mask, seq_index) + (~counted).float()
        truncated = _per_sequence((raw > seq_is_cap).float(), mask, seq_index) > 0
    if token_mask_k is not None:
        keep = keep * (d.abs() <= math.log(token_mask_k)).float()
    if geo_mask_k is not None:
        lengths = sequence_sums(torch.ones_like(d), mask, seq_index, n_seq).clamp(min=1)
        inside = ((seq_sum / lengths).abs() <= math.log(geo_mask_k)).float()
        keep = keep * _per_sequence(inside, mask, seq_index)
    return Correction(weight=weight, keep=keep, truncated=truncated)


class MismatchStats:
    """Learner-vs-server mismatch of one optimizer step, accumulated over its micro-batches.

    Keys of `metrics()` (d = log p_learner - log p_server per counted token):
        mismatch_abs_mean / _p99 / _max     |d|
        mismatch_seq_log_ratio_mean         mean over sequences of sum_t d (log of the sequence IS ratio)
        mismatch_seq_log_ratio_abs_max      its largest magnitude
        mismatch_kl                         KL(server || learner) per token, k3: mean exp(d) - 1 - d
        corrected_token_fraction            tokens whose IS weight was truncated at its cap
        masked_token_fraction               tokens dropped by a token or sequence mask
        masked_seq_fraction                 sequences with every token dropped
    and, per policy-version lag L of the rollouts (versions behind the learner's last push):
        tokens_lagL, mismatch_abs_mean_lagL, mismatch_kl_lagL, masked_token_fraction_lagL
    Quantiles and maxima are over this process's tokens (with data parallelism: its shard).
    """

    def __init__(self):
        self.d: list[torch.Tensor] = []
        self.lag: list[torch.Tensor] = []
        self.masked: list[torch.Tensor] = []
        self.truncated: list[torch.Tensor] = []
        self.seq_sums: list[torch.Tensor] = []
        self.seq_kept: list[torch.Tensor] = []

    def add(
        self,
        learner: torch.Tensor,
        behavior: torch.Tensor,
        mask: torch.Tensor,
        seq_index: torch.Tensor,
        lag: torch.Tensor,
        corr: Correction | None = None,
    ) -> None:
        counted = mask > 0
        if not bool(counted.any()):
            return
        d = (learner.detach() - behavior).float()
        self.d.append(d[counted].cpu())
        self.lag.append(lag[counted].cpu())
        keep = corr.keep if corr is not None else mask
        self.masked.append((keep[counted] == 0).cpu())
        self.truncated.append((corr.truncated[counted] if corr is not None else torch.zeros_like(d[counted])).cpu())
        present = torch.unique(seq_index[counted])
        n_seq = int(present.max()) + 1
        self.seq_sums.append(sequence_sums(d * counted, mask, seq_index, n_seq)[present].cpu())
        self.seq_kept.append((sequence_sums(keep.float(), mask, seq_index, n_seq)[present] > 0).cpu())

    def metrics(self) -> dict[str, float]:
        if not self.d:
            return {}
        d, lag = torch.cat(self.d), torch.cat(self.lag)
        masked, truncated = torch.cat(self.masked).float(), torch.cat(self.truncated).float()
        seq, kept = torch.cat(self.seq_sums), torch.cat(self.seq_kept)
        absd = d.abs()
        k3 = torch.exp(d) - 1.0 - d
        out = {
            "mismatch_abs_mean": float(absd.mean()),
            "mismatch_abs_p99": float(torch.quantile(absd, 0.99)),
            "mismatch_abs_max": float(absd.max()),
            "mismatch_seq_log_ratio_mean": float(seq.mean()),
            "mismatch_seq_log_ratio_abs_max": float(seq.abs().max()),
            "mismatch_kl": float(k3.mean()),
            "corrected_token_fraction": float(truncated.mean()),
            "masked_token_fraction": float(masked.mean()),
            "masked_seq_fraction": float((~kept).float().mean()),
        }
        for value in sorted(set(lag.tolist())):
            at = lag == value
            out[f"tokens_lag{int(value)}"] = int(at.sum())
            out[f"mismatch_abs_mean_lag{int(value)}"] = float(absd[at].mean())
            out[f"mismatch_kl_lag{int(value)}"] = float(k3[at].mean())
            out[f"masked_token_fraction_lag{int(value)}"] = float(masked[at].mean())
        return out
