"""Every setting of `flywheel sample` (each mode's Config) and of the queue, typed and described.

In one light module (pydantic, and sampler/rewards' RewardSpec; no redis, no HTTP client) so that
`flywheel up`'s loop config can hold GrpoSampleConfig as a typed field, and a component's config
can be imported and checked without importing what runs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from flywheel.sampler.rewards.combine import RewardSpec


class QueueConfig(BaseModel):
    """Where the queue lives and how it behaves; shared by the sampler's and the trainer's configs."""

    url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis URL")
    stream: str = Field(default="rollouts", description="Redis stream name")
    group: str = Field(default="trainer", description="Consumer group that reads the stream")
    max_backlog: int = Field(default=2048, ge=1, description="Producers block while this many entries are unacked")
    claim_idle_s: float = Field(default=60.0, gt=0, description="Reclaim entries pending (unacked) longer than this")
    max_deliveries: int = Field(
        default=3, ge=1, description="Dead-letter an entry after this many deliveries without ack"
    )
    retry_for_s: float | None = Field(
        default=None, description="Give up after Redis is unreachable this long (None: retry forever)"
    )
    trim_every: int = Field(default=64, ge=1, description="Trim acked entries every this many puts")


class EndpointConfig(BaseModel):
    """An OpenAI-compatible server."""

    base_url: str = Field(default="http://127.0.0.1:8000/v1", description="Base URL of the OpenAI API (ends in /v1)")
    model: str | None = Field(
        default=None, description="Model name to request (default: the first one /v1/models lists)"
    )
    api_key: str | None = Field(default=None, description="API key (default: $OPENAI_API_KEY, else none)")
    timeout_s: float = Field(default=600.0, gt=0, description="Per-request timeout")
    vllm_extras: bool = Field(
        default=True,
        description="Send vLLM's extra fields (return_token_ids, prompt_logprobs); off for servers that reject them",
    )


class SamplingConfig(BaseModel):
    """Sampling parameters of every request."""

    n: int = Field(default=8, ge=1, description="Samples per prompt (the GRPO group size / best-of-n)")
    temperature: float = Field(default=1.0, ge=0, description="Sampling temperature")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling threshold")
    max_tokens: int = Field(default=128, ge=1, description="Maximum completion tokens")
    seed: int | None = Field(default=None, description="Per-request seed (reproducible samples)")
    stop: list[str] | None = Field(default=None, description="Stop strings")


class PromptSourceConfig(BaseModel):
    """Where prompts come from."""

    kind: Literal["gym", "jsonl", "capture"] = Field(
        default="gym", description="gym: a reasoning-gym task; jsonl: a file; capture: the production prompts stream"
    )
    task: str = Field(default="chain_sum", description="reasoning-gym task name (kind=gym)")
    task_options: dict[str, Any] = Field(
        default_factory=lambda: {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1},
        description="reasoning-gym dataset options (kind=gym); the default is the easiest chain_sum",
    )
    seed: int = Field(default=0, description="reasoning-gym dataset seed (kind=gym)")
    path: Path | None = Field(default=None, description="JSONL file of prompts (kind=jsonl)")
    num_prompts: int | None = Field(
        default=64, ge=1, description="How many prompts to use (None: all of the file / forever for capture and gym)"
    )
    instruction: str = Field(
        default="\nThink briefly, then end your reply with 'Answer: <answer>'.",
        description="Appended to gym questions so the answer can be extracted",
    )
    system: str | None = Field(default=None, description="Optional system message put before every prompt")
    capture_stream: str = Field(
        default="prompts", description="Redis stream of captured production requests (kind=capture)"
    )
    capture_group: str = Field(
        default="sampler", description="Consumer group the sampler reads the capture stream with"
    )
    production_fraction: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description=(
            "kind gym/jsonl: also take about this fraction of the prompts from the capture stream (production "
            "prompts mixed with the task's; when none is waiting, a task prompt goes instead)"
        ),
    )


class SampleConfig(BaseModel):
    """Settings shared by every `flywheel sample` mode."""

    endpoint: EndpointConfig = Field(default_factory=EndpointConfig, description="The server to sample from")
    prompts: PromptSourceConfig = Field(default_factory=PromptSourceConfig, description="Where prompts come from")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling parameters")
    rewards: list[RewardSpec] | None = Field(
        default=None,
        description=(
            "Reward terms [{'name','weight','options'}] (default: reasoning_gym for gym prompts, math_verify otherwise)"
        ),
    )
    production_rewards: list[RewardSpec] | None = Field(
        default=None,
        description=(
            "Reward terms of captured production prompts without a reference answer, e.g. a judge "
            "[{'name': 'http', 'options': {'url': ...}}] (None: --rewards); one whose request metadata gives "
            "'answer' is scored by --production-verifier"
        ),
    )
    production_verifier: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="math_verify")],
        description="Reward terms of captured prompts whose request metadata gives a reference 'answer'",
    )
    queue: QueueConfig = Field(default_factory=QueueConfig, description="Redis queue the records go to")
    concurrency: int = Field(default=8, ge=1, description="Prompts in flight at once (each one request for n samples)")
    max_errors: int = Field(
        default=10, ge=0, description="Stop after this many failed prompts (server errors, scorer crashes)"
    )
    summary_path: Path | None = Field(default=None, description="Also write the final summary as JSON here")
    progress: bool = Field(default=True, description="Show a progress bar")


class GrpoSampleConfig(SampleConfig):
    """Sample groups for GRPO into the rollout queue."""

    to_queue: bool = Field(default=True, description="Push groups to the Redis rollout queue")
    output: Path | None = Field(default=None, description="Also append every kept record to this JSONL file")
    drop_uniform_groups: bool = Field(
        default=True, description="Drop groups whose rewards are all equal (no learning signal)"
    )
    resume: bool = Field(
        default=True,
        description=(
            "Keep a durable cursor of the prompts done and in flight in Redis (with --to-queue): a restart on the "
            "same queue and prompt source resumes after the done prompts and redoes the in-flight ones; off: every "
            "run starts the source from its beginning"
        ),
    )


class RejectionConfig(SampleConfig):
    """Best-of-n rejection sampling: SFT records and DPO pairs."""

    keep: Literal["correct", "best_k"] = Field(
        default="correct", description="SFT selection: all samples reaching min_reward, or the k best of them"
    )
    k: int = Field(default=1, ge=1, description="How many to keep per prompt with keep=best_k")
    min_reward: float = Field(default=1.0, description="A sample needs at least this reward to be kept for SFT")
    min_margin: float = Field(default=0.5, ge=0, description="DPO pair only when best - worst reward >= this")
    sft_output: Path | None = Field(
        default=Path("runs/rejection/sft.jsonl"), description="JSONL of kept SFT records (None: none)"
    )
    pairs_output: Path | None = Field(
        default=Path("runs/rejection/pairs.jsonl"), description="JSONL of DPO pairs (None: none)"
    )
    rejected_output: Path | None = Field(default=None, description="JSONL of samples not kept for SFT (for inspection)")
    to_queue: bool = Field(default=False, description="Also push kept SFT records to the Redis queue (--queue.stream)")


class DistillConfig(SampleConfig):
    """Distillation data from a teacher endpoint (--endpoint.*), streamed to JSONL."""

    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(n=1, temperature=0.7, max_tokens=256),
        description="Sampling parameters (of the teacher, or of the student when on-policy)",
    )
    student: EndpointConfig | None = Field(
        default=None, description="On-policy: the student samples, the teacher gives logprobs of its tokens"
    )
    output: Path = Field(
        default=Path("runs/distill/distill.jsonl"), description="JSONL output (appended; re-running resumes)"
    )
    to_queue: bool = Field(default=False, description="Also push records to the Redis queue")
    score: bool = Field(
        default=False, description="Also score records with --rewards (off: distillation needs no reward)"
    )
