"""docker-compose.yml, checked statically (no Docker engine here): it loads, has the loop's services,
and every --flag and FLYWHEEL_* variable it gives a component is a real field of that component's config."""

from __future__ import annotations

import shlex
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from flywheel.clients.cli import _unwrap_optional, build_config
from flywheel.clients.eval.cli import Config as EvalConfig
from flywheel.sampler.config import GrpoSampleConfig
from flywheel.server.config import ServeConfig
from flywheel.trainer.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
# `flywheel <command>` -> (config class, env prefix)
COMMANDS = {
    ("serve",): (ServeConfig, "FLYWHEEL_SERVE_"),
    ("sample", "grpo"): (GrpoSampleConfig, "FLYWHEEL_SAMPLE_GRPO_"),
    ("train",): (TrainConfig, "FLYWHEEL_TRAIN_"),
    ("eval",): (EvalConfig, "FLYWHEEL_EVAL_"),
}


def field_of(model: type[BaseModel], dotted: str):
    """The pydantic field at 'a.b.c' (nested models), or None."""
    node: typing.Any = model
    field = None
    for part in dotted.split("."):
        fields = getattr(node, "model_fields", None)
        if not fields or part not in fields:
            return None
        field = fields[part]
        node, _ = _unwrap_optional(field.annotation)
    return field


def flywheel_argv(service: dict) -> list[str]:
    """The `flywheel ...` argv of a service, also out of a `sh -c '... && flywheel ...'` command."""
    command = service["command"]
    words = command if isinstance(command, list) else shlex.split(command)
    if service.get("entrypoint", [None])[-1] == "-c" or words[:1] in (["sh"], ["/bin/sh"]):
        words = shlex.split(words[-1])
    start = words.index("flywheel")
    end = words.index("&&", start) if "&&" in words[start:] else len(words)
    return words[start + 1 : end]


def component(argv: list[str]):
    for key, value in COMMANDS.items():
        if tuple(argv[: len(key)]) == key:
            return key, value
    raise AssertionError(f"unknown flywheel command {argv[:2]}")


def test_compose_has_the_loop_services_with_health_checks_and_restarts():
    assert {"redis", "server", "server-gpu", "sampler", "trainer", "eval"} <= set(SERVICES)
    assert (
        "--appendonly" in SERVICES["redis"]["command"]
        and SERVICES["redis"]["command"][SERVICES["redis"]["command"].index("--appendonly") + 1] == "yes"
    )
    for name in ("redis", "server", "server-gpu"):
        assert SERVICES[name]["healthcheck"]["test"], name
    for name in ("redis", "server", "server-gpu", "sampler", "trainer", "eval"):
        assert SERVICES[name]["restart"] in ("unless-stopped", "on-failure", "always"), name
    gpu = SERVICES["server-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["image"].startswith("vllm/vllm-openai")
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "server" in gpu["networks"]["default"]["aliases"]  # the sampler and trainer find it by the same name
    # the pieces agree: one queue, one server, the trainer pushes where the sampler samples
    sampler, trainer = flywheel_argv(SERVICES["sampler"]), flywheel_argv(SERVICES["trainer"])

    def value(argv, flag):
        return argv[argv.index(flag) + 1]

    assert value(sampler, "--queue.url") == value(trainer, "--queue.url") == "redis://redis:6379/0"
    assert value(sampler, "--endpoint.base-url") == value(trainer, "--push-url") + "/v1"
    assert value(sampler, "--sampling.n") == value(trainer, "--grpo.group-size")
    assert "--resume" in trainer


@pytest.mark.parametrize("name", [n for n, s in SERVICES.items() if "flywheel" in str(s.get("command", ""))])
def test_every_flag_and_env_key_is_a_config_field(name, monkeypatch):
    service = SERVICES[name]
    argv = flywheel_argv(service)
    key, (model, env_prefix) = component(argv)
    for word in argv[len(key) :]:
        if not word.startswith("--") or word == "--config":
            continue
        dotted = word[2:].replace("-", "_")
        field = field_of(model, dotted)
        if field is None and dotted.startswith("no_"):  # --no-progress: a boolean's negative form
            field = field_of(model, dotted[3:])
            assert field is not None and _unwrap_optional(field.annotation)[0] is bool, f"{name}: {word}"
        assert field is not None, f"{name}: {word} is not a field of {model.__name__}"
    if "--config" in argv:
        config = REPO / argv[argv.index("--config") + 1].removeprefix("/app/")
        assert config.is_file(), config
    for env_key in service.get("environment", {}):
        if env_key.startswith("FLYWHEEL_") and env_key != "FLYWHEEL_HOME":
            assert env_key.startswith(env_prefix), f"{name}: {env_key} does not configure `flywheel {' '.join(key)}`"
            dotted = env_key[len(env_prefix) :].lower().replace("__", ".")
            assert field_of(model, dotted) is not None, f"{name}: {env_key} is not a field of {model.__name__}"
    # and the whole command parses as the CLI would parse it, with its environment (types included)
    for env_key, env_value in service.get("environment", {}).items():
        if env_key.startswith("FLYWHEEL_") and env_key != "FLYWHEEL_HOME":
            monkeypatch.setenv(env_key, "token" if str(env_value).startswith("${") else str(env_value))
    rest = [w.replace("/app/", str(REPO) + "/") if w.startswith("/app/") else w for w in argv[len(key) :]]
    build_config(model, " ".join(key), rest, prog="flywheel")


def test_the_field_check_catches_a_wrong_key():
    assert field_of(TrainConfig, "grpo.group_size") is not None
    assert field_of(TrainConfig, "grpo.group_sizes") is None
    assert field_of(ServeConfig, "port") is not None and field_of(ServeConfig, "ports") is None
