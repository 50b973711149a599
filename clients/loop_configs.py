"""`flywheel up`'s configuration: one typed model whose sections are the components' own configs.

LoopConfig says the loop's facts once (model, group size, temperature, staleness, steps, ...) and
holds each component's config as a typed field: `serve: ServeConfig`, `sample: GrpoSampleConfig`,
`train: TrainConfig`, `eval_settings:` eval's Config. Its validator sets every shared fact on the
components that need it (the sampler's n and the trainer's group size are the same group_size),
unless the component's own section sets that field (pydantic's model_fields_set tells). What only
a launch knows (ports, Redis URL, run-directory paths, resume) is set by
`component_configs`, by attribute too; then every component config is validated again by its own
class before anything starts, so a typo fails in a second, not after the server has loaded.

Imports no torch and no redis (tests/test_config_fields.py checks): `flywheel up --help` and the
children's configs are built without them.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, model_validator

from flywheel.clients.eval.cli import Config as EvalConfig
from flywheel.sampler.config import GrpoSampleConfig, PromptSourceConfig, QueueConfig
from flywheel.server.config import ServeConfig
from flywheel.server.errors import UserError
from flywheel.trainer.checkpoint import latest_train_state
from flywheel.trainer.config import TrainConfig

DEFAULT_REWARDS = [
    # correctness of the last number in the reply: SmolLM2 rarely writes 'Answer:', so a strict format has no signal
    {"name": "reasoning_gym", "weight": 1.0, "options": {"answer_format": "last_number"}},
    # a small bonus for ending with the asked-for 'Answer: <n>' line, which it can learn
    {"name": "format_regex", "weight": 0.2, "options": {"pattern": r".*Answer:\s*-?\d+\s*\.?\s*$"}},
]
EASY_CHAIN_SUM = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


def given(section: BaseModel, /, **values: Any) -> None:
    """Set each named field of `section` that the user did not set to the loop's value (validated as that field)."""
    for name, value in values.items():
        if name not in section.model_fields_set:
            field = type(section).model_fields[name]
            kind = (
                Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
            )  # with ge=, gt=, ...
            setattr(section, name, TypeAdapter(kind).validate_python(value))


class LoopConfig(BaseModel):
    """Run the whole loop: redis, server, sampler, GRPO trainer and eval on version change, with a live view."""

    run_dir: Path = Field(
        default=Path("runs/loop"),
        description="Run directory: configs, logs, redis AOF, checkpoints, metrics, eval history, report",
    )
    model: str = Field(
        default="smollm2-135m-instruct",
        description="Bundled model name (see `flywheel models`) or HF folder, served and trained",
    )
    redis_url: str | None = Field(
        default=None, description="Use this Redis instead of starting a local redis-server in run_dir/redis"
    )
    redis_server: str = Field(
        default="redis-server", description="redis-server binary to start when --redis-url is not given"
    )
    backend: Literal["transformers", "megatron"] = Field(default="transformers", description="Trainer backend")
    trainer_ranks: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Trainer processes; above 1 the trainer runs under torchrun (megatron only: world = TP x PP x DP). "
            "Default: the fewest that train.parallel needs (1 unless it splits the model)"
        ),
    )
    sync: bool = Field(default=False, description="Generate, train, push, repeat (no overlap) instead of async")
    max_steps: int = Field(
        default=30, gt=0, description="Optimizer steps of the whole run; the loop ends by itself after them"
    )
    push_every: int = Field(
        default=2, gt=0, description="Push weights to the server every K optimizer steps (one new policy version)"
    )
    max_staleness: int = Field(
        default=2, ge=0, description="The trainer drops rollouts more than this many versions behind its last push"
    )
    group_size: int = Field(default=8, ge=2, description="Completions per prompt (the GRPO group)")
    batch_size: int = Field(default=16, gt=0, description="Completions per optimizer step (a multiple of group_size)")
    max_backlog: int | None = Field(
        default=None,
        ge=1,
        description="Unacked rollouts the sampler may run ahead (default: 2 x batch_size x push_every)",
    )
    lr: float = Field(
        default=1e-5,
        gt=0,
        description=(
            "Trainer peak learning rate (1e-5 taught SmolLM2-135M the task in 30 steps; 2e-6 did not in 20: "
            "bench/results/loop_learning*.json)"
        ),
    )
    max_tokens: int = Field(default=96, gt=0, description="Maximum completion tokens per sample")
    temperature: float = Field(default=1.0, gt=0, description="Sampling temperature (the trainer uses the same)")
    tis_cap: float | None = Field(
        default=2.0, gt=0, description="Truncated importance-sampling cap for off-policy correction (None: off)"
    )
    task: str = Field(default="chain_sum", description="reasoning-gym task the sampler draws prompts from")
    task_options: dict[str, Any] = Field(
        default_factory=lambda: dict(EASY_CHAIN_SUM),
        description="reasoning-gym options of the task (default: 2-term, 1-digit chain_sum)",
    )
    rewards: list[dict[str, Any]] = Field(
        default_factory=lambda: [dict(r) for r in DEFAULT_REWARDS],
        description="Reward terms [{'name','weight','options'}] (default: last-number correctness + 0.2 format bonus)",
    )
    production_prompts: Literal["off", "mix", "only"] = Field(
        default="off",
        description=(
            "Train on production prompts: the server captures requests (opt-out per request: header "
            "x-flywheel-capture: off) into the loop's Redis and the sampler takes prompts from that stream, "
            "mixed with the task's (mix) or instead of them (only)"
        ),
    )
    production_fraction: float = Field(
        default=0.5, gt=0, le=1, description="With --production-prompts mix: about this share of prompts is captured"
    )
    production_rewards: list[dict[str, Any]] | None = Field(
        default=None,
        description=(
            "Reward of production prompts without a reference answer, e.g. a judge [{'name': 'http', 'options': "
            "{'url': ...}}] (default: --rewards); one whose request metadata gives 'answer' is scored by math_verify"
        ),
    )
    sampler_concurrency: int = Field(
        default=4, ge=1, description="Prompts the sampler keeps in flight (each one request for group_size samples)"
    )
    seed: int = Field(default=0, description="Seed of the training prompts (the eval set uses a far-away seed)")
    eval: bool = Field(default=True, description="Evaluate every new policy version on a held-out set of the task")
    eval_size: int = Field(default=20, ge=1, description="Held-out problems evaluated per version (greedy)")
    eval_seed: int = Field(
        default=10_000_000, description="reasoning-gym seed of the held-out set (far from the training seeds)"
    )
    eval_wait_s: float = Field(
        default=300.0, ge=0, description="At the end, wait this long for eval to score the final version"
    )
    report: bool = Field(default=True, description="Write run_dir/report.html at the end")
    live: bool | None = Field(
        default=None,
        description="Rich live view (default: when stdout is a terminal; else one status line per refresh)",
    )
    refresh_s: float = Field(
        default=2.0, gt=0, description="Seconds between status refreshes (also appended to run_dir/up/status.jsonl)"
    )
    restarts: int = Field(
        default=3,
        ge=0,
        description=(
            "Times each component (redis, server, sampler, trainer, eval) is restarted in place after it exits "
            "unexpectedly (crashed, killed), as compose's `restart: on-failure` does; the next one stops the loop"
        ),
    )
    restart_backoff_s: float = Field(
        default=2.0,
        ge=0,
        description=(
            "Delay before a component's restart, doubled while it keeps dying within a minute of its start (<= 30 s)"
        ),
    )
    startup_timeout_s: float = Field(
        default=900.0, gt=0, description="Give up when the server is not healthy after this long"
    )
    serve: ServeConfig = Field(
        default_factory=ServeConfig,
        description=(
            "`flywheel serve` settings (ServeConfig): the loop sets the model, its name, the port and data_dir "
            "unless given here"
        ),
    )
    sample: GrpoSampleConfig = Field(
        default_factory=GrpoSampleConfig,
        description=(
            "`flywheel sample grpo` settings (GrpoSampleConfig): the loop sets the endpoint, prompts, sampling, "
            "rewards and queue unless given here"
        ),
    )
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(objective="grpo", queue=QueueConfig()),
        description=(
            "`flywheel train` settings (TrainConfig): the loop sets objective, model, queue, steps, pushes and "
            "GRPO's group size and temperature unless given here"
        ),
    )
    eval_settings: EvalConfig = Field(
        default_factory=EvalConfig,
        description=(
            "`flywheel eval` settings (eval's Config): the loop sets the endpoint, the held-out set and --watch "
            "unless given here"
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _trainer_reads_the_queue(cls, data: Any) -> Any:
        # TrainConfig alone refuses a config with neither files nor a queue; the loop's trainer always
        # reads the queue, so a partial `train:` section starts from that
        if isinstance(data, dict) and isinstance(data.get("train"), dict):
            data = {**data, "train": {"objective": "grpo", "queue": {}, **data["train"]}}
        return data

    @model_validator(mode="after")
    def _share_loop_facts(self) -> LoopConfig:
        """The loop's facts, said once above, set on every component that needs them (unless its section sets them)."""
        backlog = self.max_backlog or 2 * self.batch_size * self.push_every
        given(self.serve, model=self.model, served_model_name=Path(self.model).name)
        given(self.sample, rewards=self.rewards, concurrency=self.sampler_concurrency, progress=False)
        share_production_facts(self)  # first: it decides the prompts' kind
        given(self.sample.prompts, kind="gym", task=self.task, task_options=self.task_options, num_prompts=None)
        given(self.sample.sampling, n=self.group_size, temperature=self.temperature, max_tokens=self.max_tokens)
        given(self.sample.queue, max_backlog=backlog)
        train = self.train
        given(
            train,
            objective="grpo",
            backend=self.backend,
            model=self.model,
            lr=self.lr,
            max_steps=self.max_steps,
            batch_size=self.batch_size,
            save_every=self.push_every,
            push_every=self.push_every,
            max_staleness=self.max_staleness,
        )
        if train.queue is not None:  # None only when the train: section sets it so (and gives --data instead)
            given(train.queue, max_backlog=backlog)
        given(train.queue_input, max_wait_s=3600.0)
        given(train.grpo, group_size=self.group_size, temperature=self.temperature, tis_cap=self.tis_cap)
        given(
            self.eval_settings,
            custom_scorer="math_verify",
            max_tokens=self.max_tokens,
            temperature=0.0,
            watch=True,
            poll_s=3.0,
        )
        ranks = self.trainer_world_size()
        if ranks > 1 and train.backend != "megatron":
            raise UserError(
                f"the trainer needs {ranks} ranks (trainer_ranks / train.parallel {train.parallel.model_dump()}): "
                "use --backend megatron (the transformers backend trains in one process)"
            )
        return self

    def trainer_world_size(self) -> int:
        """How many trainer ranks to launch: trainer_ranks, else the fewest train.parallel allows.

        megatron's world is TP x PP x DP, and EP must divide TP x DP: with TP = t and EP = e the
        fewest data-parallel replicas is e / gcd(e, t)."""
        p = self.train.parallel
        fewest = p.tensor * p.pipeline * (p.expert // math.gcd(p.expert, p.tensor))
        if self.trainer_ranks is None:
            return fewest
        if self.trainer_ranks % (p.tensor * p.pipeline) or (self.trainer_ranks // p.pipeline) % p.expert:
            raise UserError(
                f"trainer_ranks {self.trainer_ranks} does not fit train.parallel {p.model_dump()} "
                f"(world = TP x PP x DP, EP must divide TP x DP; the fewest is {fewest})"
            )
        return self.trainer_ranks


def share_production_facts(config: LoopConfig) -> None:
    """--production-prompts: the sampler's prompts come from the capture stream (only) or partly (mix),
    and production prompts get --production-rewards. (The server's capture is pointed at the loop's
    Redis by `component_configs`: only a launch knows its URL.)"""
    if config.production_prompts == "off":
        return
    prompts = config.sample.prompts
    if config.production_prompts == "only":
        if "kind" in prompts.model_fields_set and prompts.kind != "capture":
            raise UserError(
                f"--production-prompts only takes every prompt from the capture: sample.prompts.kind is {prompts.kind}"
            )
        given(prompts, kind="capture")
    elif prompts.kind == "capture":
        raise UserError("--production-prompts mix mixes captured prompts into a task's: sample.prompts.kind is capture")
    else:
        given(prompts, production_fraction=config.production_fraction)
    given(prompts, capture_stream=config.serve.capture_stream)
    if config.production_rewards is not None:
        given(config.sample, production_rewards=config.production_rewards)


def server_data_dir(run_dir: Path) -> Path:
    """run_dir/server, unless that is too long for vLLM's ZMQ socket paths (107 bytes with a uuid
    appended); then a short folder under /tmp named after the run directory."""
    path = Path(run_dir) / "server"
    if len(str(path / "tmp")) + 40 <= 100:
        return path
    return Path(tempfile.gettempdir()) / f"flywheel-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:12]}"


def write_heldout(config: LoopConfig, path: Path) -> Path:
    """A fixed-seed held-out set of the training task, in `flywheel eval`'s custom JSONL format."""
    import reasoning_gym

    if path.is_file():
        return path  # fixed by seed: keep the file the earlier versions were scored on
    data = reasoning_gym.create_dataset(
        config.task, size=config.eval_size, seed=config.eval_seed, **config.task_options
    )
    instruction = PromptSourceConfig.model_fields["instruction"].default
    with path.open("w") as fh:
        for i in range(config.eval_size):
            entry = data[i]
            fh.write(
                json.dumps(
                    {
                        "id": f"{config.task}:{config.eval_seed}:{i}",
                        "prompt": entry["question"] + instruction,
                        "answer": str(entry["answer"]),
                        "scorer": "math_verify",
                    }
                )
                + "\n"
            )
    return path


def checked(key: str, config: BaseModel) -> BaseModel:
    """`config` validated again by its own class (its validators run on the values the loop set)."""
    try:
        return type(config).model_validate(config.model_dump())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(map(str, first["loc"])) or "config"
        raise UserError(f"invalid {key} setting {where}: {first['msg']} (got {first.get('input')!r})") from None


def component_configs(config: LoopConfig, run_dir: Path, redis_url: str, server_port: int) -> dict[str, BaseModel]:
    """serve / sample / train / eval configs of one launch (validated), keyed by child name."""
    server_url = f"http://127.0.0.1:{server_port}"
    serve = config.serve.model_copy(deep=True)
    serve.port = server_port  # the section's port when it set one, else a free one (Loop picks it)
    given(serve, data_dir=server_data_dir(run_dir))
    if config.production_prompts != "off":
        given(serve, capture_redis_url=redis_url)  # the sampler reads the captures from the loop's Redis
    name = serve.served_model_name

    sample = config.sample.model_copy(deep=True)
    given(sample.endpoint, base_url=server_url + "/v1", model=name)
    # One prompt sequence for every launch of the run: a relaunched sampler resumes it from its
    # durable cursor in Redis (sampler/cursor.py), after the prompts done and redoing those in flight.
    # (A new seed per launch skipped the rest of the old range and mixed in the new one.)
    given(sample.prompts, seed=config.seed)
    given(sample.queue, url=redis_url)
    given(sample, output=run_dir / "sampler" / "rollouts.jsonl", summary_path=run_dir / "sampler" / "summary.json")

    train = config.train.model_copy(deep=True)
    if train.queue is not None:
        given(train.queue, url=redis_url)
    given(
        train, run_dir=run_dir / "train", resume=latest_train_state(run_dir / "train") is not None, push_url=server_url
    )
    out: dict[str, BaseModel] = {"serve": serve, "sample": sample, "train": train}
    if config.eval:
        heldout = write_heldout(config, run_dir / "eval" / "heldout.jsonl")
        evaluate = config.eval_settings.model_copy(deep=True)
        given(
            evaluate,
            base_url=server_url + "/v1",
            model=name,
            benchmarks=[f"custom:{heldout}"],
            history=run_dir / "eval" / "history.jsonl",
            output_dir=run_dir / "eval",
        )
        out["eval"] = evaluate
    return {key: checked(key, value) for key, value in out.items()}


def sync_sample_config(sample: GrpoSampleConfig, config: LoopConfig, round_index: int) -> GrpoSampleConfig:
    """One sync round: exactly push_every steps' worth of prompts (uniform groups kept so the count is exact).

    The whole round must fit under the queue's backlog bound: nothing is consumed until the sampler
    has exited, so a smaller bound would block the sampler forever."""
    prompts = config.push_every * config.batch_size // config.group_size
    out = sample.model_copy(deep=True)
    out.prompts.seed, out.prompts.num_prompts = sample.prompts.seed + round_index * prompts, prompts
    out.drop_uniform_groups = False
    out.queue.max_backlog = max(sample.queue.max_backlog, prompts * config.group_size)
    return out


def sync_train_config(train: TrainConfig, config: LoopConfig, resume: bool) -> TrainConfig:
    """One sync round: train push_every steps (the last one pushes and checkpoints), then exit."""
    return train.model_copy(update={"resume": resume, "stop_after": config.push_every})
