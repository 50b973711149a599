"""Configs: every field of every command's config is described (the description is its --help), and
the config modules import neither torch nor redis (building or checking a config needs neither)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from flywheel.clients.cli import COMMANDS

REPO = Path(__file__).resolve().parents[1]
CONFIG_MODULES = [
    "flywheel.server.config",
    "flywheel.server.status",
    "flywheel.sampler.config",
    "flywheel.trainer.config",
    "flywheel.trainer.policy_interface",
    "flywheel.clients.loop_configs",
]


def nested_models(tp) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation (X, X | None, list[X], dict[str, X], ...)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    if typing.get_origin(tp) in (typing.Union, types.UnionType, list, tuple, dict, typing.Annotated):
        return [m for arg in typing.get_args(tp) for m in nested_models(arg)]
    return []


def command_configs() -> set[type[BaseModel]]:
    """Every command's and subcommand's Config, every model nested in one, and the backends' PolicyConfig."""
    from flywheel.trainer.policy_interface import PolicyConfig  # built from TrainConfig, not a field of it

    todo: list[type[BaseModel]] = [PolicyConfig]
    for module_path, _ in COMMANDS.values():
        module = importlib.import_module(module_path)
        todo += [module.Config] + [cls for cls, _ in getattr(module, "SUBCOMMANDS", {}).values()]
    seen: set[type[BaseModel]] = set()
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.add(cls)
            todo += [m for f in cls.model_fields.values() for m in nested_models(f.annotation)]
    return seen


def test_every_config_field_has_a_description():
    configs = command_configs()
    assert len(configs) > 20  # the walk reaches the nested ones (loop -> train -> grpo, queue, parallel, ...)
    missing = sorted(
        f"{cls.__module__}.{cls.__name__}.{name}"
        for cls in configs
        for name, field in cls.model_fields.items()
        if not (field.description or "").strip()
    )
    assert not missing, "fields without a description: " + ", ".join(missing)


@pytest.mark.parametrize("module", CONFIG_MODULES)
def test_config_module_imports_no_torch_or_redis(module):
    code = f"import json, sys; import {module}; print(json.dumps([m for m in ('torch', 'redis') if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [], f"{module} imports {out.stdout.strip()} at import time"
