"""User feedback on served completions: POST /v1/feedback, and the Redis hash it lands in.

A production route (the OpenAI routes' API key, not the admin token). The body (FeedbackRequest):
    {"id": "<completion id as the OpenAI SDK returned it>", "rating": "up" | "down" | <number>,
     "choice_index": 0, "comment": "...", "preferred": "<a better answer>"}
A numeric rating must lie in the server's declared range (`feedback_scores`, default 1..5); "up" and
"down" are its top and bottom. The reward is the rating mapped onto [0, 1].

Answers (the one OpenAI error envelope): 200 FeedbackResponse; 404 when the id is unknown or its
capture expired (only captured completions can be rated: capture's rate and redaction rules hold);
422 for a rating out of range, a choice index the completion does not have, or a malformed body
(`param` names the field); 404 too when this server has no feedback (no capture).

Storage (the format, owned here; sampler/feedback.py reads it): the Redis hash
`feedback_key(stream)`, field `<completion id>/<choice index>`, value = msgpack of FeedbackRecord
(framing of server/framing.py), which embeds the capture of the completion, so feedback outlives the
capture link. A second rating of the same choice replaces the first: one field per choice, counted once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flywheel.server.capture import CapturedRequest, link_key
from flywheel.server.framing import from_msgpack, to_msgpack, validate_versioned
from flywheel.server.routes import error

FEEDBACK_PATH = "/v1/feedback"
SCHEMA_VERSION = 1

router = APIRouter()


class FeedbackFormatError(ValueError):
    """Bytes that are not a feedback record of this schema."""


def feedback_key(stream: str) -> str:
    """Redis hash of every rating of the completions captured into `stream`."""
    return f"{stream}:feedback"


def feedback_field(completion_id: str, choice_index: int) -> str:
    return f"{completion_id}/{choice_index}"


class FeedbackRequest(BaseModel):
    """The body of POST /v1/feedback."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=256, description="The completion's id, as the OpenAI SDK returned it")
    rating: Literal["up", "down"] | float = Field(
        description="Thumbs up/down, or a score within the server's declared range (feedback_scores)"
    )
    choice_index: int = Field(default=0, ge=0, description="Which choice of the completion is rated (n > 1)")
    comment: str | None = Field(default=None, max_length=10_000, description="Free-text comment")
    preferred: str | None = Field(
        default=None, min_length=1, max_length=100_000, description="An answer the user would have preferred"
    )

    @field_validator("rating", mode="before")
    @classmethod
    def _not_bool(cls, value):
        if isinstance(value, bool):
            raise ValueError("rating must be 'up', 'down' or a number, not a boolean")
        return value


class FeedbackRecord(BaseModel):
    """One rating as stored in the feedback hash (the last rating of a choice)."""

    schema_version: int = Field(default=SCHEMA_VERSION, description="Version of this format")
    completion_id: str = Field(description="The rated completion's id")
    choice_index: int = Field(default=0, description="The rated choice")
    rating: Literal["up", "down"] | float = Field(description="The rating as given")
    reward: float = Field(description="The rating mapped onto [0, 1] over the declared range (down 0, up 1)")
    comment: str | None = Field(default=None, description="Free-text comment")
    preferred: str | None = Field(default=None, description="An answer the user would have preferred")
    rated_at: float = Field(default_factory=time.time, description="Unix time of the rating")
    capture: CapturedRequest = Field(description="The capture of the rated completion (prompt, tokens, logprobs)")

    def to_bytes(self) -> bytes:
        return to_msgpack(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> FeedbackRecord:
        obj = from_msgpack(data, FeedbackFormatError)
        return validate_versioned(cls, obj, what="feedback", schema_version=SCHEMA_VERSION, error=FeedbackFormatError)


class FeedbackResponse(BaseModel):
    """The body of a 200 from POST /v1/feedback."""

    object: Literal["feedback"] = Field(default="feedback", description="Object type")
    id: str = Field(description="The rated completion's id")
    choice_index: int = Field(description="The rated choice")
    reward: float = Field(description="The reward this rating becomes, in [0, 1]")
    replaced: bool = Field(description="Whether an earlier rating of this choice was replaced")


def rating_reward(rating: str | float, scores: tuple[float, float]) -> float:
    """The reward in [0, 1] of a rating; ValueError when a number lies outside the declared range."""
    low, high = scores
    if rating == "up":
        return 1.0
    if rating == "down":
        return 0.0
    if not low <= float(rating) <= high:
        raise ValueError(f"rating {rating} is outside the declared range [{low:g}, {high:g}] (or use 'up'/'down')")
    return (float(rating) - low) / (high - low)


class FeedbackStore:
    """The server's side of the hash: find a completion's capture, store a rating."""

    def __init__(self, redis_url: str, stream: str, scores: tuple[float, float], wait_s: float = 2.0):
        import redis.asyncio

        self.redis = redis.asyncio.Redis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
        self.stream, self.scores, self.wait_s = stream, scores, wait_s

    async def capture(self, completion_id: str) -> CapturedRequest | None:
        """The capture of a completion, waiting up to wait_s for one still being written (the capture
        is written after its response was sent, so a fast client can rate before it lands)."""
        deadline = time.monotonic() + self.wait_s
        while True:
            data = await self.redis.get(link_key(self.stream, completion_id))
            if data is not None:
                return CapturedRequest.from_bytes(data)
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.1)

    async def put(self, record: FeedbackRecord) -> bool:
        """Store a rating; True when it replaced an earlier one of the same choice."""
        field = feedback_field(record.completion_id, record.choice_index)
        added = await self.redis.hset(feedback_key(self.stream), field, record.to_bytes())
        return added == 0


@router.post(FEEDBACK_PATH)
async def feedback(request: Request) -> JSONResponse:
    """Rate a served completion (see the module docstring)."""
    store: FeedbackStore | None = request.app.state.flywheel_feedback
    if store is None:
        return error(404, "feedback is off on this server: it needs capture (--capture-redis-url)", "not_found_error")
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deeply, was a 500
        return error(400, "the body must be a JSON object")
    try:
        asked = FeedbackRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("float", "literal")))
        return error(422, f"{param or 'body'}: {first['msg']}", param=param or None)
    try:
        reward = rating_reward(asked.rating, store.scores)
    except ValueError as exc:
        return error(422, str(exc), param="rating")
    capture = await store.capture(asked.id)
    if capture is None:
        return error(404, f"unknown or expired completion id {asked.id!r}", "not_found_error", param="id")
    if asked.choice_index >= len(capture.responses):
        return error(
            422,
            f"completion {asked.id!r} has {len(capture.responses)} choice(s), not {asked.choice_index + 1}",
            param="choice_index",
        )
    record = FeedbackRecord(
        completion_id=asked.id,
        choice_index=asked.choice_index,
        rating=asked.rating,
        reward=reward,
        comment=asked.comment,
        preferred=asked.preferred,
        capture=capture,
    )
    replaced = await store.put(record)
    answer = FeedbackResponse(id=asked.id, choice_index=asked.choice_index, reward=reward, replaced=replaced)
    return JSONResponse(answer.model_dump(mode="json"))
