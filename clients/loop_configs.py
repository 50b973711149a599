"""Each component's configuration for `flywheel up`, derived from its one Config and checked by the component's own class.

The loop's settings (model, group size, staleness, ...) are said once in clients/up.py's Config and
fanned out here so that the sampler and the trainer agree (same queue, same group size, same
temperature); the per-component sections (`serve:`, `sample:`, `train:`, `eval_settings:`) are
merged on top. Every dict is validated by ServeConfig / GrpoSampleConfig / TrainConfig / eval's Config
before anything starts, so a typo fails in a second, not after the server has loaded.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sampler.config import PromptSourceConfig
from trainer.checkpoint import latest_train_state
from server.errors import UserError

SEED_STRIDE = 100_000  # prompts one launch may draw before the next launch's seed range starts


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def server_data_dir(run_dir: Path) -> Path:
    """run_dir/server, unless that is too long for vLLM's ZMQ socket paths (107 bytes with a uuid
    appended); then a short folder under /tmp named after the run directory."""
    path = Path(run_dir) / "server"
    if len(str(path / "tmp")) + 40 <= 100:
        return path
    return Path(tempfile.gettempdir()) / f"flywheel-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]}"


def served_name(config) -> str:
    return config.serve.get("served_model_name") or Path(config.model).name


def write_heldout(config, path: Path) -> Path:
    """A fixed-seed held-out set of the training task, in `flywheel eval`'s custom JSONL format."""
    import reasoning_gym

    if path.is_file():
        return path  # fixed by seed: keep the file the earlier versions were scored on
    data = reasoning_gym.create_dataset(config.task, size=config.eval_size, seed=config.eval_seed, **config.task_options)
    instruction = PromptSourceConfig.model_fields["instruction"].default
    with path.open("w") as fh:
        for i in range(config.eval_size):
            entry = data[i]
            fh.write(json.dumps({"id": f"{config.task}:{config.eval_seed}:{i}", "prompt": entry["question"] + instruction,
                                 "answer": str(entry["answer"]), "scorer": "math_verify"}) + "\n")
    return path


def component_configs(config, run_dir: Path, redis_url: str, server_port: int, launch: int) -> dict[str, dict[str, Any]]:
    """serve / sample / train / eval settings as plain dicts (already validated), keyed by child name."""
    from clients.eval.cli import Config as EvalConfig
    from sampler.config import GrpoSampleConfig
    from server.config import ServeConfig
    from trainer.config import TrainConfig

    server_url = f"http://127.0.0.1:{server_port}"
    name = served_name(config)
    backlog = config.max_backlog or 2 * config.batch_size * config.push_every
    queue = {"url": redis_url, "max_backlog": backlog}
    serve = deep_merge({"model": config.model, "served_model_name": name, "port": server_port,
                        "data_dir": str(server_data_dir(run_dir)), "max_model_len": 2048}, config.serve)
    sample = deep_merge({
        "endpoint": {"base_url": server_url + "/v1", "model": name},
        "prompts": {"kind": "gym", "task": config.task, "task_options": config.task_options,
                    "seed": config.seed + launch * SEED_STRIDE, "num_prompts": None},
        "sampling": {"n": config.group_size, "temperature": config.temperature, "max_tokens": config.max_tokens},
        "rewards": config.rewards, "queue": queue, "concurrency": config.sampler_concurrency, "progress": False,
        "output": str(run_dir / "sampler" / "rollouts.jsonl"), "summary_path": str(run_dir / "sampler" / "summary.json"),
    }, config.sample)
    train = deep_merge({
        "objective": "grpo", "backend": config.backend, "model": config.model, "queue": queue,
        "queue_input": {"consumer": "trainer-0", "max_wait_s": 3600.0}, "run_dir": str(run_dir / "train"),
        "resume": latest_train_state(run_dir / "train") is not None, "lr": config.lr, "max_steps": config.max_steps,
        "batch_size": config.batch_size, "save_every": config.push_every, "push_every": config.push_every,
        "push_url": server_url, "max_staleness": config.max_staleness,
        "grpo": {"group_size": config.group_size, "temperature": config.temperature, "tis_cap": config.tis_cap},
    }, config.train)
    out = {"serve": serve, "sample": sample, "train": train}
    if config.eval:
        heldout = write_heldout(config, run_dir / "eval" / "heldout.jsonl")
        out["eval"] = deep_merge({
            "base_url": server_url + "/v1", "model": name, "benchmarks": [f"custom:{heldout}"],
            "custom_scorer": "math_verify", "max_tokens": config.max_tokens, "temperature": 0.0, "watch": True,
            "history": str(run_dir / "eval" / "history.jsonl"), "output_dir": str(run_dir / "eval"), "poll_s": 3.0,
        }, config.eval_settings)
    classes = {"serve": ServeConfig, "sample": GrpoSampleConfig, "train": TrainConfig, "eval": EvalConfig}
    for key, values in out.items():
        try:
            classes[key].model_validate(values)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "config"
            raise UserError(f"invalid {key} setting {where}: {first['msg']} (got {first.get('input')!r})") from None
    return out


def sync_sample_config(sample: dict[str, Any], config, round_index: int) -> dict[str, Any]:
    """One sync round: exactly push_every steps' worth of prompts (uniform groups kept so the count is exact).

    The whole round must fit under the queue's backlog bound: nothing is consumed until the sampler
    has exited, so a smaller bound would block the sampler forever."""
    prompts = config.push_every * config.batch_size // config.group_size
    backlog = max(sample["queue"]["max_backlog"], prompts * config.group_size)
    return deep_merge(sample, {"prompts": {"seed": sample["prompts"]["seed"] + round_index * prompts, "num_prompts": prompts},
                               "drop_uniform_groups": False, "queue": {"max_backlog": backlog}})


def sync_train_config(train: dict[str, Any], config, resume: bool) -> dict[str, Any]:
    """One sync round: train push_every steps (the last one pushes and checkpoints), then exit."""
    return deep_merge(train, {"resume": resume, "stop_after": config.push_every})
