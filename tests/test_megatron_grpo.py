"""GRPO on the megatron backend gives the transformers backend's numbers, step by step (world size 1, gloo, fp32).

The same rollout file (sampled from the tiny Qwen3 with HF generate, so behaviour == policy at step 0),
the same seed and config, 3 optimizer steps through trainer.train on `backend: transformers` and
`backend: megatron`: loss, gradient norm, importance ratio, KL to the frozen reference and the
learner/behaviour mismatch agree within 1e-4 at every step. The KL term makes both backends build
their frozen reference policy too, and the mismatch after step 1 shows the update itself agreed.
"""

from __future__ import annotations

import json

import pytest

from flywheel.trainer.backend import build_policy
from flywheel.trainer.policy_interface import PolicyConfig
from flywheel.trainer.train import train
from tests.test_trainer_grpo import grpo_config, sample_records

COMPARED = ("loss", "grad_norm", "ratio_mean", "kl", "mismatch_abs_mean", "reward_mean")


@pytest.fixture(scope="module")
def megatron_world():
    from flywheel.trainer.megatron.parallel import shutdown

    yield
    shutdown()


def test_grpo_losses_agree_over_three_steps(tmp_path, tiny_model, megatron_world):
    records = sample_records(build_policy(PolicyConfig(model=str(tiny_model))), groups=2, group_size=4)
    path = tmp_path / "rollouts.jsonl"
    path.write_text("".join(r.to_json() + "\n" for r in records))
    rows = {}
    for backend in ("transformers", "megatron"):
        config = grpo_config(
            tmp_path / backend,
            tiny_model,
            backend=backend,
            data=[str(path)],
            batch_size=8,
            micro_batch_tokens=64,  # two micro-batches a step: gradient accumulation is compared too
            max_steps=3,
            lr=3e-3,
            warmup_steps=0,
            seed=1,
            grpo={"kl_coef": 0.1, "tis_cap": 2.0},
        )
        train(config)
        rows[backend] = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
    hf, mg = rows["transformers"], rows["megatron"]
    assert len(hf) == len(mg) == 3
    for step, (a, b) in enumerate(zip(hf, mg)):
        for key in COMPARED:
            assert abs(a[key] - b[key]) < 1e-4, f"step {step + 1} {key}: transformers {a[key]} megatron {b[key]}"
    # the comparison is not of constants: the policy moved, so KL and the mismatch grew from 0
    assert hf[0]["kl"] == pytest.approx(0.0, abs=1e-6) and hf[-1]["kl"] > 1e-4
    assert hf[0]["mismatch_abs_mean"] < 1e-4 < hf[-1]["mismatch_abs_mean"]
    assert len({round(r["loss"], 6) for r in hf}) == 3
