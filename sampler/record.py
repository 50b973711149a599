"""The rollout record: what the sampler produces and the trainer consumes.

Wire format (owned here, documented here):
    A record is a pydantic model serialised with msgpack as a map of its fields (`to_bytes`, the
    framing of server/framing.py, shared with the capture format),
    stored in one Redis stream entry under the field `r`, or one JSON object per line in JSONL
    (`to_json`). `schema_version` is checked on decode: a record from an unknown schema is
    refused (RecordError), never half-read.

Token in, token out: `prompt_token_ids` and `completion_token_ids` are the ids the server saw and
produced; the trainer trains on exactly those and never re-tokenizes. `behavior_logprobs[i]` is
the server's processed log-probability (after temperature/top-p) of `completion_token_ids[i]`.
`policy_versions` lists every weight version that produced a token of this completion (more than
one when a push happened mid-generation with pause mode `keep`); `policy_version` is the oldest,
the one staleness is measured from.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from flywheel.server.framing import from_msgpack, to_msgpack, validate_versioned

SCHEMA_VERSION = 1


class RecordError(ValueError):
    """Bytes or JSON that are not a valid rollout record of this schema."""


class Reward(BaseModel):
    """One scorer's verdict on a completion."""

    name: str = Field(description="Registered scorer name, e.g. 'math_verify' or 'format_think'")
    value: float = Field(description="The score; rewards are summed with their weights into RolloutRecord.reward")
    weight: float = Field(default=1.0, description="Weight of this scorer in the total reward")
    details: dict[str, Any] = Field(
        default_factory=dict, description="Scorer-specific explanation (extracted answer, error, ...)"
    )


class RolloutRecord(BaseModel):
    """One prompt + one completion, with everything the learner needs to train on it."""

    schema_version: int = Field(default=SCHEMA_VERSION, description="Version of this record schema")
    id: str = Field(default_factory=lambda: uuid.uuid4().hex, description="Unique id: the trainer's idempotency key")
    group_id: str = Field(default="", description="Shared by all samples of one prompt (GRPO group)")
    source: Literal["sampled", "distilled", "production"] = Field(
        default="sampled", description="Where the completion came from"
    )
    task: str = Field(default="", description="Dataset/task name the prompt came from")
    messages: list[dict[str, Any]] | None = Field(
        default=None, description="Chat messages of the prompt (None for raw completions)"
    )
    prompt: str = Field(default="", description="Prompt text as sent (after the chat template), for humans and scorers")
    completion: str = Field(default="", description="Completion text, for humans and scorers")
    prompt_token_ids: list[int] = Field(description="Token ids of the prompt, exactly as the server saw them")
    completion_token_ids: list[int] = Field(description="Token ids the server generated")
    behavior_logprobs: list[float] | None = Field(
        default=None, description="Per completion token: the sampler's processed logprob"
    )
    teacher_logprobs: list[float] | None = Field(
        default=None, description="Per completion token: a teacher's logprob (on-policy distillation)"
    )
    policy_version: int = Field(default=0, description="Oldest weight version that produced a token of this completion")
    policy_versions: list[int] = Field(default_factory=list, description="Every weight version that contributed")
    rewards: list[Reward] = Field(default_factory=list, description="Each scorer's verdict")
    reward: float = Field(default=0.0, description="Total reward: sum of value * weight over `rewards`")
    answer: Any = Field(default=None, description="Reference answer / metadata the scorers used")
    finish_reason: str | None = Field(default=None, description="'stop', 'length', 'abort', ...")
    sampling: dict[str, Any] = Field(
        default_factory=dict, description="Sampling parameters used (temperature, top_p, max_tokens, seed)"
    )
    created_at: float = Field(default_factory=time.time, description="Unix time the completion finished")

    @model_validator(mode="after")
    def _check(self) -> RolloutRecord:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(f"schema_version {self.schema_version} is not supported (expected {SCHEMA_VERSION})")
        n = len(self.completion_token_ids)
        for name in ("behavior_logprobs", "teacher_logprobs"):
            values = getattr(self, name)
            if values is not None and len(values) != n:
                raise ValueError(f"{name} has {len(values)} entries for {n} completion tokens")
        if not self.policy_versions:
            self.policy_versions = [self.policy_version]
        self.policy_version = min(self.policy_versions)
        return self

    # ---- serialisation
    def to_bytes(self) -> bytes:
        return to_msgpack(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> RolloutRecord:
        return cls.from_obj(from_msgpack(data, RecordError))

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, line: str) -> RolloutRecord:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecordError(f"not JSON: {exc}") from None
        return cls.from_obj(obj)

    @classmethod
    def from_obj(cls, obj: Any) -> RolloutRecord:
        return validate_versioned(cls, obj, what="record", schema_version=SCHEMA_VERSION, error=RecordError)

    def total_reward(self) -> float:
        return sum(r.value * r.weight for r in self.rewards)
