"""Each loss against a reference computed by hand (plain Python math) on a tiny case."""

from __future__ import annotations

import math

import pytest
import torch

from flywheel.trainer.losses import aggregate, dpo_loss, group_advantages, grpo_loss, k3_kl, nll_loss


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_nll_counts_only_masked_tokens():
    lp = t([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    mask = t([[1, 0, 1], [0, 1, 0]])
    assert nll_loss(lp, mask).item() == pytest.approx((1 + 3 + 5) / 3)
    # a step-wide normaliser (grad accumulation) divides by it instead
    assert nll_loss(lp, mask, num_tokens=9).item() == pytest.approx(9 / 9)


def test_dpo_loss_margins_accuracy():
    pc, pr, rc, rr = t([-1.0, -3.0]), t([-2.0, -1.0]), t([-1.5, -2.0]), t([-1.5, -1.5])
    beta = 0.5
    margins = [beta * ((-1.0 + 1.5) - (-2.0 + 1.5)), beta * ((-3.0 + 2.0) - (-1.0 + 1.5))]  # [0.5, -0.75]
    expected = sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 2
    loss, m, acc = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m.tolist() == pytest.approx(margins)
    assert acc.item() == pytest.approx(0.5)


def test_group_advantages_normalise_and_count_zero_variance():
    rewards = t([1.0, 0.0, 0.0, 2.0, 2.0, 5.0])
    groups = ["a", "a", "a", "b", "b", "c"]
    adv, zero = group_advantages(rewards, groups)
    mean_a = 1 / 3
    std_a = math.sqrt(((1 - mean_a) ** 2 + 2 * mean_a**2) / 2)  # Bessel
    assert adv[:3].tolist() == pytest.approx([(1 - mean_a) / std_a, -mean_a / std_a, -mean_a / std_a], rel=1e-5)
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]  # b has equal rewards, c is a group of one
    assert zero == 2
    dr, _ = group_advantages(rewards, groups, scale_by_std=False)
    assert dr[:3].tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3])
    with pytest.raises(ValueError, match="3 rewards for 2 group ids"):
        group_advantages(t([1.0, 2.0, 3.0]), ["a", "b"])


def test_k3_kl_matches_formula_and_is_zero_at_equality():
    p, q = t([[-1.0, -2.0]]), t([[-1.5, -2.0]])
    assert k3_kl(p, q)[0, 0].item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)
    assert k3_kl(p, q)[0, 1].item() == 0.0


def test_aggregations_token_seq_and_dr_grpo():
    # two sequences packed in one row plus one in a second row; lengths 2, 1, 3
    per_token = t([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 6.0, 9.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 1, 0]])
    seq = torch.tensor([[0, 0, 1, -1], [2, 2, 2, -1]])
    assert aggregate(per_token, mask, seq, "token-mean").item() == pytest.approx(21 / 6)
    assert aggregate(per_token, mask, seq, "seq-mean").item() == pytest.approx((3 / 2 + 3 / 1 + 15 / 3) / 3)
    assert aggregate(per_token, mask, seq, "dr-grpo", constant=4).item() == pytest.approx(21 / (3 * 4))
    with pytest.raises(ValueError, match="constant"):
        aggregate(per_token, mask, seq, "dr-grpo")


def test_grpo_loss_clipping_by_hand():
    # token 0: ratio e^0.5 = 1.65, A = +1 -> clipped at 1.2 ; token 1: ratio e^-0.5 = 0.61, A = +1 -> unclipped
    # token 2: ratio e^0.5, A = -1 -> min(-1.65, -1.2) = -1.65 (unclipped: pessimistic side)
    lp = t([[0.0, 0.0, 0.0]]).requires_grad_()
    behavior = t([[-0.5, 0.5, -0.5]])
    adv = t([[1.0, 1.0, -1.0]])
    mask = t([[1, 1, 1]])
    seq = torch.tensor([[0, 0, 1]])
    loss, metrics = grpo_loss(lp, behavior, adv, mask, seq, clip_low=0.2, clip_high=0.2)
    r = math.exp(0.5)
    expected = -(1.2 + math.exp(-0.5) - r) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["clip_fraction"] == pytest.approx(1 / 3)
    loss.backward()
    # clipped token has zero gradient; the others have d(-rho*A)/dp / 3 = -rho*A/3
    assert lp.grad[0].tolist() == pytest.approx([0.0, -math.exp(-0.5) / 3, r / 3], rel=1e-6)


def test_grpo_loss_kl_and_tis():
    lp = t([[-1.0, -1.0]])
    prox = t([[-1.0, -1.0]])
    behavior = t([[-3.0, -0.5]])  # exp(prox - behavior) = e^2 (capped at 2) and e^-0.5
    ref = t([[-1.2, -1.0]])
    adv = t([[1.0, 1.0]])
    mask = t([[1, 1]])
    seq = torch.tensor([[0, 0]])
    loss, metrics = grpo_loss(
        lp, behavior, adv, mask, seq, proximal_logprobs=prox, tis_cap=2.0, ref_logprobs=ref, kl_coef=0.1
    )
    kl0 = math.exp(-0.2) + 0.2 - 1
    expected = (-(2.0 * 1.0) + 0.1 * kl0 + -(math.exp(-0.5) * 1.0)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["tis_weight_mean"] == pytest.approx((2.0 + math.exp(-0.5)) / 2)
    assert metrics["kl"] == pytest.approx(kl0 / 2)


def test_split_micro_batches_sum_to_full_batch_loss():
    """With step-wide normalisers, per-micro-batch losses add up to the full-batch loss."""
    torch.manual_seed(0)
    lp, behavior, adv = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    mask = (torch.rand(4, 5) > 0.3).float()
    seq = torch.arange(4).unsqueeze(1).expand(4, 5).contiguous()
    lengths = mask.sum(1)
    for mode in ("token-mean", "seq-mean", "dr-grpo"):
        norm = dict(num_tokens=float(mask.sum()), num_seqs=4, seq_lengths=lengths, constant=5.0)
        full, _ = grpo_loss(lp, behavior, adv, mask, seq, aggregation=mode, **norm)
        parts = sum(
            grpo_loss(
                lp[i : i + 2],
                behavior[i : i + 2],
                adv[i : i + 2],
                mask[i : i + 2],
                seq[i : i + 2],
                aggregation=mode,
                **norm,
            )[0]
            for i in (0, 2)
        )
        assert parts.item() == pytest.approx(full.item(), rel=1e-5), mode
