"""trainer/rollout_selection.py against hand-computed values: overlong penalty, dynamic sampling, their counts."""

from __future__ import annotations

import pytest

from flywheel.sampler.record import RolloutRecord
from flywheel.trainer.checkpoint import TrainState
from flywheel.trainer.config import TrainConfig
from flywheel.trainer.rollout_selection import overlong_penalty, select_rollouts
from flywheel.trainer.sources import FileSource


def record(group: str, reward: float, n: int = 4, finish: str = "stop", max_tokens: int | None = 10, version=5):
    return RolloutRecord(
        group_id=group,
        prompt_token_ids=[1],
        completion_token_ids=[2] * n,
        behavior_logprobs=[-1.0] * n,
        reward=reward,
        finish_reason=finish,
        sampling={} if max_tokens is None else {"max_tokens": max_tokens},
        policy_version=version,
    )


def config(**grpo) -> TrainConfig:
    return TrainConfig(objective="grpo", data=["unused"], max_staleness=1, grpo=grpo)


@pytest.mark.parametrize(
    ("n", "finish", "max_tokens", "buffer", "expected"),
    [
        (6, "stop", 10, 4, 0.0),  # n <= M - B = 6: no penalty
        (7, "stop", 10, 4, -0.25 * 0.5),  # one token into the 4-token buffer, P = 0.5
        (9, "stop", 10, 4, -0.75 * 0.5),
        (10, "length", 10, 4, -0.5),  # at max_tokens: the whole penalty
        (9, "stop", 10, None, -0.5 * 0.5),  # default buffer M // 5 = 2: (9 - 8) / 2
        (10, "length", 10, 0, -0.5),  # buffer 0: a cliff at the limit
        (9, "stop", 10, 0, 0.0),
        (3, "length", None, 4, -0.5),  # cut, no max_tokens on the record: the whole penalty
        (3, "stop", None, 4, 0.0),
    ],
)
def test_overlong_penalty_is_dapo_linear_in_the_buffer(n, finish, max_tokens, buffer, expected):
    g = config(overlong="penalty", overlong_buffer=buffer, overlong_penalty=0.5).grpo
    assert overlong_penalty(record("a", 0.0, n, finish, max_tokens), g) == pytest.approx(expected)


def test_default_buffer_is_a_fifth_of_max_tokens():
    g = config(overlong="penalty").grpo  # P = 1, M = 10, B = 2: ramp over tokens 9, 10
    assert [overlong_penalty(record("a", 0.0, n), g) for n in (8, 9, 10)] == pytest.approx([0.0, -0.5, -1.0])


def test_penalty_shapes_the_rewards_and_is_counted():
    recs = [record("a", 1.0, 4), record("a", 1.0, 9), record("a", 0.0, 10, "length")]
    sel = select_rollouts(recs, config(overlong="penalty", overlong_buffer=4), current_version=0)
    assert sel.rewards == pytest.approx([1.0, 1.0 - 0.75, 0.0 - 1.0])
    assert sel.counts["overlong_penalised"] == 2
    assert sel.counts["overlong_penalty_mean"] == pytest.approx(-1.75 / 3)
    assert [r.reward for r in sel.records] == [1.0, 1.0, 0.0]  # the records keep the sampler's reward


def test_dynamic_sampling_drops_groups_without_signal_after_the_other_rules():
    recs = [
        record("mixed", 1.0),
        record("mixed", 0.0),
        record("uniform", 1.0),
        record("uniform", 1.0),
        # unequal as sampled, uniform once its cut completion is filtered
        record("cut", 1.0),
        record("cut", 1.0),
        record("cut", 0.0, 10, "length"),
        # unequal as sampled, one member left once the stale one is dropped
        record("stale", 1.0, version=5),
        record("stale", 0.0, version=3),
    ]
    off = select_rollouts(recs, config(overlong="filter"), current_version=5)
    assert off.counts == {"dropped_stale": 1, "dropped_overlong": 1}
    assert len(off.records) == 7
    on = select_rollouts(recs, config(overlong="filter", dynamic_sampling=True), current_version=5)
    assert [r.group_id for r in on.records] == ["mixed", "mixed"]
    assert on.counts == {
        "dropped_stale": 1,
        "dropped_overlong": 1,
        "dynamic_dropped_groups": 3,
        "dynamic_dropped_rollouts": 5,
    }
    # equal as sampled, unequal once penalised: the penalty is part of the reward the rule looks at
    pen = [record("p", 1.0, 4), record("p", 1.0, 10, "length")]
    assert len(select_rollouts(pen, config(overlong="penalty", dynamic_sampling=True), 0).records) == 2
    assert select_rollouts(pen, config(dynamic_sampling=True), 0).records == []


def test_dynamic_sampling_with_the_queue_needs_whole_groups():
    with pytest.raises(ValueError, match="group_size"):
        TrainConfig(objective="grpo", queue={"url": "redis://x"}, grpo={"dynamic_sampling": True})


def test_files_pool_keeps_groups_with_signal_and_drops_their_cut_members_per_step(tmp_path):
    recs = [record("mixed", 1.0), record("mixed", 0.0), record("mixed", 1.0, 10, "length")]
    recs += [record("uniform", 1.0), record("uniform", 1.0)]
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(r.to_json() + "\n" for r in recs))
    cfg = TrainConfig(
        objective="grpo", data=[str(path)], batch_size=3, grpo={"overlong": "filter", "dynamic_sampling": True}
    )
    source = FileSource(cfg, tokenizer=None)
    assert [r.group_id for r in source.items] == ["mixed"] * 3  # the uniform group left the pool
    data = source.next_step(0, TrainState())
    assert data.info["dropped_overlong"] == 1 and data.info["completions"] == 2
    assert data.info["dynamic_dropped_groups"] == 1 and data.info["dynamic_dropped_rollouts"] == 2
    assert sorted(s.advantage for s in data.items) == pytest.approx([-0.7071, 0.7071], abs=1e-3)
