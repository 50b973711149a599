"""The one ParallelConfig: CLI flags and YAML keys reach both backends; unsupported splits fail clearly."""

from __future__ import annotations

import pytest

from flywheel.clients.cli import build_config
from flywheel.server.errors import UserError
from flywheel.trainer.backend import build_policy
from flywheel.trainer.config import TrainConfig
from flywheel.trainer.policy_interface import ParallelConfig, PolicyConfig


def test_cli_flags_and_yaml_keys_build_the_same_parallel_config(tmp_path):
    flags = build_config(
        TrainConfig,
        "train",
        ["--data", "x.jsonl", "--parallel.tensor", "2", "--parallel.pipeline", "2", "--parallel.expert", "1"],
        prog="flywheel",
    )
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("train:\n  data: [x.jsonl]\n  parallel: {tensor: 2, pipeline: 2}\n")
    from_yaml = build_config(TrainConfig, "train", ["--config", str(yaml_file)], prog="flywheel")
    assert flags.parallel == from_yaml.parallel == ParallelConfig(tensor=2, pipeline=2)
    policy = flags.policy_config()
    assert isinstance(policy.parallel, ParallelConfig) and policy.parallel == flags.parallel
    # megatron reads the same object under its own names
    assert (policy.parallel.tensor_parallel, policy.parallel.pipeline_parallel, policy.parallel.expert_parallel) == (
        2,
        2,
        1,
    )
    with pytest.raises(UserError, match="--parallel.tensor"):
        build_config(TrainConfig, "train", ["--data", "x.jsonl", "--parallel.tensor", "0"], prog="flywheel")


def test_every_parallel_field_is_described():
    assert all(f.description for f in ParallelConfig.model_fields.values())


def test_transformers_backend_refuses_model_parallel_degrees(tiny_model):
    with pytest.raises(UserError, match="transformers backend runs one process"):
        build_policy(PolicyConfig(backend="transformers", model=str(tiny_model), parallel=ParallelConfig(tensor=2)))
