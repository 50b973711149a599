"""GRPO on the real tiny Qwen3: staleness, a learnable reward going up, and the file-input recipe end to end.

Sampling for these unit tests is done locally with HF generate (temperature 1, no top-k/top-p, so
the behaviour logprobs are the policy's own); the served loop is tested with the server.
"""

from __future__ import annotations

import json

import pytest
import torch

from flywheel.clients.tiny_reward import TARGET  # reward = fraction of completion tokens equal to this id
from flywheel.sampler.record import RolloutRecord
from flywheel.trainer.backend import build_policy
from flywheel.trainer.checkpoint import TrainState
from flywheel.trainer.config import TrainConfig
from flywheel.trainer.objectives import grpo_backward
from flywheel.trainer.optim import build_optimizer
from flywheel.trainer.policy_interface import IGNORE, PolicyConfig
from flywheel.trainer.sources import rollout_step
from flywheel.trainer.train import train

PROMPT = [8713, TARGET, TARGET, TARGET]  # the tiny tied-embedding model copies tokens: mixed rewards at start
NEW_TOKENS = 8


def sample_records(policy, groups: int, group_size: int, version: int = 0, seed: int = 0) -> list[RolloutRecord]:
    torch.manual_seed(seed)
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        out = policy.model.generate(
            prompt.repeat(groups * group_size, 1),
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            pad_token_id=0,
        )
        targets = torch.cat([out[:, 1:], torch.full((len(out), 1), IGNORE)], 1)
        targets[:, : len(PROMPT) - 1] = IGNORE
        positions = torch.arange(out.shape[1]).expand_as(out)
        logprobs = policy.forward_logprobs(out, positions, targets)[:, len(PROMPT) - 1 : -1]
    records = []
    for i, row in enumerate(out):
        completion = row[len(PROMPT) :].tolist()
        records.append(
            RolloutRecord(
                group_id=f"g{seed}-{i // group_size}",
                prompt_token_ids=PROMPT,
                completion_token_ids=completion,
                behavior_logprobs=logprobs[i].tolist(),
                reward=sum(t == TARGET for t in completion) / len(completion),
                policy_version=version,
            )
        )
    return records


def grpo_config(tmp_path, tiny_model, **overrides) -> TrainConfig:
    values = dict(
        objective="grpo",
        model=str(tiny_model),
        data=["unused"],
        run_dir=tmp_path / "run",
        lr=1e-2,
        max_seq_len=64,
        micro_batch_tokens=256,
        batch_size=32,
        max_steps=100,
        save_every=0,
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_stale_rollouts_are_dropped_and_counted(tmp_path, tiny_model):
    config = grpo_config(tmp_path, tiny_model, max_staleness=2)
    records = [
        RolloutRecord(
            group_id="a",
            prompt_token_ids=[1],
            completion_token_ids=[2],
            behavior_logprobs=[-1.0],
            reward=float(i),
            policy_versions=[v],
        )
        for i, v in enumerate([1, 2, 3, 5])
    ]
    records.append(
        RolloutRecord(
            group_id="b",
            prompt_token_ids=[1],
            completion_token_ids=[2],
            behavior_logprobs=[-1.0],
            reward=1.0,
            policy_versions=[5, 2],
        )
    )  # oldest contributing version counts
    data = rollout_step(records, config, TrainState(pushed_version=5))
    assert data.info["dropped_stale"] == 3  # versions 1, 2 and the mixed [5, 2]
    assert data.info["completions"] == 2 and data.info["zero_variance_groups"] == 0
    assert [s.advantage for s in data.items] == pytest.approx([-0.7071, 0.7071], abs=1e-3)
    assert len(data.record_ids) == 5  # dropped records are used up too (acked with the step)


def test_completions_of_captured_production_prompts_are_counted(tmp_path, tiny_model):
    config = grpo_config(tmp_path, tiny_model, max_staleness=2)
    records = [
        RolloutRecord(
            group_id=group,
            prompt_token_ids=[1],
            completion_token_ids=[2],
            behavior_logprobs=[-1.0],
            reward=float(i % 2),
            policy_versions=[v],
        )
        for i, (group, v) in enumerate(
            [("capture:c1#a", 5), ("capture:c1#a", 5), ("capture:c2#b", 1), ("capture:c2#b", 1), ("g:0:1#c", 5)]
            + [("g:0:1#c", 5)]
        )
    ]
    data = rollout_step(records, config, TrainState(pushed_version=5))
    # the stale production group is not trained, so not counted; the task's group is not production
    assert data.info["completions"] == 4 and data.info["production_completions"] == 2


def test_grpo_raises_mean_reward_of_a_learnable_reward(tmp_path, tiny_model):
    config = grpo_config(tmp_path, tiny_model, lr=3e-3)
    policy = build_policy(config.policy_config())
    optimizer, _ = build_optimizer(policy.parameters(), config)
    rewards = []
    for step in range(12):
        records = sample_records(policy, groups=4, group_size=8, seed=step)
        rewards.append(sum(r.reward for r in records) / len(records))
        data = rollout_step(records, config, TrainState())
        metrics = grpo_backward(policy, data.items, config, pad_id=0)
        assert metrics["ratio_mean"] == pytest.approx(1.0, abs=1e-3)  # on-policy: behaviour == current
        policy.clip_grad_norm(config.grad_clip)
        optimizer.step()
        optimizer.zero_grad()
    final = sample_records(policy, groups=4, group_size=8, seed=99)
    final_reward = sum(r.reward for r in final) / len(final)
    # measured: 0.06 at the start, ~0.3 after 12 steps and ~0.8 after 16 (lr 3e-3, 32 completions a step)
    assert rewards[0] < 0.15
    assert final_reward > rewards[0] + 0.15, (rewards, final_reward)


def test_grpo_recipe_from_a_rollout_file_with_kl_and_tis(tmp_path, tiny_model):
    policy = build_policy(PolicyConfig(model=str(tiny_model)))
    records = sample_records(policy, groups=2, group_size=4)
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(r.to_json() + "\n" for r in records))
    config = grpo_config(
        tmp_path,
        tiny_model,
        data=[str(path)],
        batch_size=8,
        max_steps=3,
        lr=1e-3,
        grpo={"kl_coef": 0.1, "tis_cap": 2.0, "aggregation": "seq-mean"},
    )
    state = train(config)
    rows = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert state.step == 3 and len(rows) == 3
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] > 0  # moved away from the reference
    assert rows[0]["tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert rows[0]["reward_mean"] == pytest.approx(sum(r.reward for r in records) / 8)
    assert all(r["dropped_stale"] == 0 for r in rows)


def test_mismatch_metrics_show_a_temperature_mismatch(tmp_path, tiny_model):
    """Rollouts sampled at temperature 1 but trained as if at 0.5: the metrics measure exactly that gap."""
    policy = build_policy(PolicyConfig(model=str(tiny_model)))
    records = sample_records(policy, groups=2, group_size=4)
    same = grpo_config(tmp_path, tiny_model, batch_size=8)
    other = grpo_config(tmp_path, tiny_model, batch_size=8, grpo={"temperature": 0.5})
    matched = grpo_backward(policy, rollout_step(records, same, TrainState()).items, same, pad_id=0)
    policy.model.zero_grad()
    shifted = grpo_backward(policy, rollout_step(records, other, TrainState()).items, other, pad_id=0)
    assert matched["mismatch_abs_max"] < 1e-4 and matched["mismatch_kl"] < 1e-8
    # the learner's logprobs at 0.5, taken independently: |log p_0.5 - log p_1| per completion token
    out = torch.tensor([r.prompt_token_ids + r.completion_token_ids for r in records])
    targets = torch.cat([out[:, 1:], torch.full((len(out), 1), IGNORE)], 1)
    targets[:, : len(PROMPT) - 1] = IGNORE
    with torch.no_grad():
        cold = policy.forward_logprobs(out, torch.arange(out.shape[1]).expand_as(out), targets, temperature=0.5)
    d = cold[:, len(PROMPT) - 1 : -1] - torch.tensor([r.behavior_logprobs for r in records])
    assert shifted["mismatch_abs_mean"] == pytest.approx(float(d.abs().mean()), rel=1e-4)
    assert shifted["mismatch_abs_max"] == pytest.approx(float(d.abs().max()), rel=1e-4)
    assert shifted["mismatch_kl"] == pytest.approx(float((d.exp() - 1 - d).mean()), rel=1e-3)
    assert shifted["mismatch_abs_mean"] > 0.05 and shifted["tokens_lag0"] == 8 * NEW_TOKENS
    assert shifted["mismatch_abs_mean_lag0"] == shifted["mismatch_abs_mean"]


@pytest.mark.parametrize(
    "grpo",
    [
        {"loss": "gspo", "aggregation": "seq-mean"},
        {"loss": "cispo"},
        {"tis_cap": None, "seq_is_cap": 2.0, "geo_mask_k": 1.5},
        {"overlong": "filter"},
        {"overlong": "penalty", "overlong_buffer": 4},
    ],
    ids=["gspo", "cispo", "seq-is-geo-mask", "overlong-filter", "overlong-penalty"],
)
def test_grpo_recipe_runs_each_loss_and_correction(tmp_path, tiny_model, grpo):
    policy = build_policy(PolicyConfig(model=str(tiny_model)))
    records = sample_records(policy, groups=2, group_size=4)
    for r in records:
        r.sampling = {"max_tokens": NEW_TOKENS + 2}  # every completion is NEW_TOKENS long: 2 into a 4-token buffer
    for r in records[::4]:
        r.finish_reason = "length"  # one cut completion per group
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(r.to_json() + "\n" for r in records))
    config = grpo_config(tmp_path, tiny_model, data=[str(path)], batch_size=8, max_steps=2, lr=1e-3, grpo=grpo)
    state = train(config)
    rows = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert state.step == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[0]["mismatch_abs_max"] < 1e-4  # sampled by this policy: no mismatch before the first update
    assert rows[-1]["mismatch_abs_mean"] > 0  # the update moved the learner away from the rollouts' policy
    if grpo.get("overlong") == "filter":
        assert all(r["dropped_overlong"] == 2 and r["completions"] == 6 for r in rows)
        assert rows[0]["tokens"] == 6 * NEW_TOKENS
    elif grpo.get("overlong") == "penalty":
        # 6 completions 2 tokens into the buffer (-2/4) and 2 cut ones (-1): every one penalised
        assert all(r["overlong_penalised"] == 8 and r["dropped_overlong"] == 0 for r in rows)
        assert rows[0]["overlong_penalty_mean"] == pytest.approx((6 * -0.5 + 2 * -1.0) / 8)
        assert rows[0]["tokens"] == 8 * NEW_TOKENS
    else:
        assert all(r["dropped_overlong"] == 0 and r["tokens"] == 8 * NEW_TOKENS for r in rows)


def test_dynamic_sampling_takes_groups_without_signal_out_of_the_files_pool(tmp_path, tiny_model):
    policy = build_policy(PolicyConfig(model=str(tiny_model)))
    records = sample_records(policy, groups=3, group_size=4)
    for r in records[4:8]:
        r.reward = 0.5  # group 1: all equal, no signal
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(r.to_json() + "\n" for r in records))
    rows = {}
    for on in (False, True):
        config = grpo_config(
            tmp_path / str(on), tiny_model, data=[str(path)], batch_size=8, max_steps=2, grpo={"dynamic_sampling": on}
        )
        train(config)
        rows[on] = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    # off: the uniform group takes batch slots with zero advantage; on: it left the pool, every slot has signal
    assert all(r["zero_variance_groups"] == 1 and "dynamic_dropped_groups" not in r for r in rows[False])
    assert all(r["zero_variance_groups"] == 0 for r in rows[True])
    assert all(r["dynamic_dropped_groups"] == 1 and r["dynamic_dropped_rollouts"] == 4 for r in rows[True])
    assert all(r["completions"] == 8 for r in rows[True])
    pool = [r.reward for r in records[:4] + records[8:]]
    assert all(r["reward_mean"] == pytest.approx(sum(pool) / 8) for r in rows[True])  # a step: the 8 left
