"""Each loss against a reference computed by hand (plain Python math) on a tiny case."""

from __future__ import annotations

import math

import pytest
import torch

from flywheel.trainer.losses import aggregate, dpo_loss, group_advantages, grpo_loss, k3_kl, nll_loss
from flywheel.trainer.off_policy import MismatchStats, correction


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
    corr = correction(prox, behavior, mask, seq, tis_cap=2.0)
    assert corr.truncated.tolist() == [[True, False]]
    loss, metrics = grpo_loss(
        lp, behavior, adv, mask, seq, proximal_logprobs=prox, weight=corr.weight, ref_logprobs=ref, kl_coef=0.1
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


# ---------------------------------------------------------------- corrections (trainer/off_policy.py)
# two sequences: seq 0 = tokens 0, 1 (d = +1.0, +0.5), seq 1 = tokens 2, 3 (d = -3.0, +0.2); d = learner - server
LEARNER = [[0.0, 0.0, 0.0, 0.0]]
SERVER = [[-1.0, -0.5, 3.0, -0.2]]
SEQ = [[0, 0, 1, 1]]


def _corr(**kw):
    return correction(t(LEARNER), t(SERVER), t([[1, 1, 1, 1]]), torch.tensor(SEQ), **kw)


def test_sequence_is_weights_every_token_by_the_truncated_product():
    c = _corr(seq_is_cap=2.0)
    # seq 0: exp(1.5) = 4.48 -> capped at 2 ; seq 1: exp(-2.8) = 0.061
    assert c.weight[0].tolist() == pytest.approx([2.0, 2.0, math.exp(-2.8), math.exp(-2.8)], rel=1e-5)
    assert c.truncated[0].tolist() == [True, True, False, False]
    assert c.keep[0].tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="alternatives"):
        _corr(seq_is_cap=2.0, tis_cap=2.0)


def test_token_mask_drops_tokens_outside_one_over_k_to_k():
    c = _corr(token_mask_k=2.0)  # log 2 = 0.693: |1.0| and |-3.0| are outside
    assert c.keep[0].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert c.weight[0].tolist() == [1.0] * 4  # masking alone weights nothing


def test_geometric_mean_mask_drops_whole_sequences():
    c = _corr(geo_mask_k=2.0)  # means: seq 0 0.75 (> log 2 = 0.69: dropped), seq 1 -1.4 (dropped)
    assert c.keep[0].tolist() == [0.0, 0.0, 0.0, 0.0]
    c = _corr(geo_mask_k=3.0)  # log 3 = 1.099: seq 0 kept, seq 1 dropped
    assert c.keep[0].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_corrections_change_the_update_as_documented():
    """Masked tokens get no gradient; a weight scales a token's gradient by exactly that weight."""
    adv, mask, seq = t([[1.0, 1.0, 1.0, 1.0]]), t([[1, 1, 1, 1]]), torch.tensor(SEQ)
    grads = {}
    kinds = {
        "none": {},
        "tis": {"tis_cap": 2.0},
        "mask": {"token_mask_k": 2.0},
        "seq_is": {"seq_is_cap": 2.0},
        "geo": {"geo_mask_k": 3.0},
    }
    for name, kw in kinds.items():
        lp = t(LEARNER).requires_grad_()
        c = _corr(**kw)
        loss, _ = grpo_loss(lp, t(SERVER), adv, mask, seq, proximal_logprobs=t(LEARNER), weight=c.weight, keep=c.keep)
        loss.backward()
        grads[name] = lp.grad[0].tolist()
    assert grads["none"] == pytest.approx([-0.25] * 4)  # ratio 1 everywhere: d(-r A)/dp / 4
    assert grads["tis"] == pytest.approx([-0.5, -math.exp(0.5) / 4, -math.exp(-3.0) / 4, -math.exp(0.2) / 4], rel=1e-5)
    assert grads["mask"] == pytest.approx([0.0, -0.25, 0.0, -0.25])
    # sequence IS: every token of a sequence scaled by its truncated product (seq 0: e^1.5 -> 2, seq 1: e^-2.8)
    assert grads["seq_is"] == pytest.approx([-0.5, -0.5, -math.exp(-2.8) / 4, -math.exp(-2.8) / 4], rel=1e-5)
    assert grads["geo"] == pytest.approx([-0.25, -0.25, 0.0, 0.0])  # seq 1's mean -1.4 is outside log 3


def test_gspo_uses_one_length_normalised_ratio_per_sequence():
    lp = t([[0.0, 0.0, 0.0]]).requires_grad_()
    behavior = t([[-0.2, 0.0, 0.1]])  # seq 0: mean log-ratio 0.1 -> s = e^0.1 = 1.105 ; seq 1: s = e^-0.1
    adv, mask, seq = t([[1.0, 1.0, 1.0]]), t([[1, 1, 1]]), torch.tensor([[0, 0, 1]])
    loss, metrics = grpo_loss(
        lp, behavior, adv, mask, seq, loss_type="gspo", clip_low=0.05, clip_high=0.05, aggregation="seq-mean"
    )
    s1 = math.exp(-0.1)
    assert loss.item() == pytest.approx(-(1.05 + s1) / 2, rel=1e-6)  # seq 0 clipped at 1.05, seq 1 not
    assert metrics["clip_fraction"] == pytest.approx(2 / 3)  # both tokens of seq 0
    assert metrics["ratio_mean"] == pytest.approx((2 * math.exp(0.1) + s1) / 3, rel=1e-6)
    loss.backward()
    # seq 0 clipped: no gradient; seq 1 (one token): d(-s A)/dp / 2 sequences = -s / 2
    assert lp.grad[0].tolist() == pytest.approx([0.0, 0.0, -s1 / 2], rel=1e-6)


def test_cispo_clips_the_weight_but_keeps_every_gradient():
    lp = t([[-1.0, -1.0]]).requires_grad_()
    behavior = t([[-3.0, -1.5]])  # ratios e^2 = 7.39 (capped at 1 + 4 = 5) and e^0.5 = 1.65 (kept)
    adv, mask, seq = t([[1.0, -1.0]]), t([[1, 1]]), torch.tensor([[0, 0]])
    loss, metrics = grpo_loss(lp, behavior, adv, mask, seq, loss_type="cispo", clip_high=4.0)
    r1 = math.exp(0.5)
    assert loss.item() == pytest.approx((-5.0 * 1 * -1.0 + -r1 * -1 * -1.0) / 2, rel=1e-6)
    assert metrics["clip_fraction"] == pytest.approx(0.5)
    loss.backward()
    # gradient -w A per token, also through the clipped one (PPO would give it 0)
    assert lp.grad[0].tolist() == pytest.approx([-5.0 / 2, r1 / 2], rel=1e-6)


def test_mismatch_stats_by_hand_and_split_by_lag():
    stats = MismatchStats()
    lag = torch.tensor([[0, 0, 2, 2]])
    stats.add(t(LEARNER), t(SERVER), t([[1, 1, 1, 1]]), torch.tensor(SEQ), lag, _corr(tis_cap=2.0, token_mask_k=2.0))
    m = stats.metrics()
    d = [1.0, 0.5, -3.0, 0.2]
    k3 = [math.exp(x) - 1 - x for x in d]
    assert m["mismatch_abs_mean"] == pytest.approx(4.7 / 4)
    assert m["mismatch_abs_max"] == pytest.approx(3.0)
    assert m["mismatch_abs_p99"] == pytest.approx(1.0 + 0.97 * 2.0, rel=1e-5)  # linear interpolation of 1.0 .. 3.0
    assert m["mismatch_seq_log_ratio_mean"] == pytest.approx((1.5 - 2.8) / 2)
    assert m["mismatch_seq_log_ratio_abs_max"] == pytest.approx(2.8)
    assert m["mismatch_kl"] == pytest.approx(sum(k3) / 4, rel=1e-5)
    assert m["corrected_token_fraction"] == pytest.approx(1 / 4)  # token 0: e^1 > 2
    assert m["masked_token_fraction"] == pytest.approx(2 / 4) and m["masked_seq_fraction"] == 0.0
    assert m["tokens_lag0"] == 2 and m["tokens_lag2"] == 2
    assert m["mismatch_abs_mean_lag0"] == pytest.approx(0.75) and m["mismatch_abs_mean_lag2"] == pytest.approx(1.6)
    assert m["mismatch_kl_lag2"] == pytest.approx((k3[2] + k3[3]) / 2, rel=1e-5)
    assert m["masked_token_fraction_lag0"] == pytest.approx(0.5) and m["masked_token_fraction_lag2"] == pytest.approx(
        0.5
    )
