"""The backend registry: `backend: transformers | megatron` -> the module that builds that Policy.

    transformers -> trainer.hf_backend.HFPolicy
    megatron     -> trainer.megatron.build_policy(config) (megatron-core GPTModel, TP/PP/EP)

The interface both implement (Policy, PolicyConfig, ParallelConfig, the batch layout) lives in
trainer/policy_interface.py, which the backends import; they never import this module, so the
registry can import them without a circle.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from flywheel.server.errors import UserError
from flywheel.trainer.policy_interface import Policy, PolicyConfig


def megatron_available() -> bool:
    return importlib.util.find_spec("flywheel.trainer.megatron") is not None


def _transformers(config: PolicyConfig) -> Policy:
    if config.parallel.splits_model:
        raise UserError(
            f"the transformers backend runs one process and cannot split the model "
            f"(parallel: {config.parallel.model_dump()}); use --backend megatron"
        )
    from flywheel.trainer.hf_backend import HFPolicy

    return HFPolicy(config)


def _megatron(config: PolicyConfig) -> Policy:
    if config.lora is not None:
        raise UserError(
            "LoRA is not supported on the megatron backend yet; use --backend transformers with --lora-rank"
        )
    if not megatron_available():
        raise UserError("backend 'megatron' is not available (trainer/megatron is missing)")
    from flywheel.trainer.megatron import build_policy as build_megatron_policy

    return build_megatron_policy(config)


BACKENDS: dict[str, Callable[[PolicyConfig], Policy]] = {"transformers": _transformers, "megatron": _megatron}


def build_policy(config: PolicyConfig) -> Policy:
    """Build the configured backend's policy from an HF folder."""
    return BACKENDS[config.backend](config)
