"""User feedback (server/feedback.py's hash) as training data: rewarded rollouts and preference pairs.

    rated(url, stream)       every stored rating (the last one of each rated choice, so each once)
    feedback_rollouts(...)   RolloutRecords: the captured prompt and completion token ids, the server's
                             behaviour logprobs and policy version(s), reward = the rating in [0, 1];
                             group_id = the prompt, so answers to one prompt are normalised together.
                             The trainer's staleness bound and TIS correction (tis_cap) apply to them
                             like to any rollout an older version produced.
    feedback_pairs(...)      DPO pairs in trainer/data.py's dpo JSONL shape: for two rated answers of
                             one prompt, the higher-rated is chosen; a `preferred` text is chosen over
                             the answer it was given for.
A rating whose capture has no token ids or logprobs (the request did not ask for them) cannot be a
rollout (token in, token out: nothing is re-tokenized); it is counted in `skipped`, and still makes pairs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from flywheel.sampler.record import Reward, RolloutRecord
from flywheel.server.feedback import FeedbackRecord, feedback_key

REWARD_NAME = "user_feedback"


def rated(url: str, stream: str = "prompts") -> list[FeedbackRecord]:
    """Every rating stored for the completions captured into `stream`, in a stable order."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        raw = client.hgetall(feedback_key(stream))
    finally:
        client.close()
    return [FeedbackRecord.from_bytes(raw[k]) for k in sorted(raw)]


def prompt_key(item: FeedbackRecord) -> str:
    """Which prompt a rated completion answered: its messages (chat) or prompt (completions)."""
    capture = item.capture
    what = capture.messages if capture.messages is not None else capture.prompt
    return "feedback:" + hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class FeedbackRollouts:
    records: list[RolloutRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "<completion id>/<choice>: why"


def feedback_rollouts(items: list[FeedbackRecord]) -> FeedbackRollouts:
    out = FeedbackRollouts()
    for item in items:
        capture, i = item.capture, item.choice_index
        ids = capture.completion_token_ids[i] if i < len(capture.completion_token_ids) else None
        logprobs = capture.completion_logprobs[i] if i < len(capture.completion_logprobs) else None
        where = f"{item.completion_id}/{i}"
        if not ids or not capture.prompt_token_ids:
            out.skipped.append(f"{where}: the capture has no token ids (the request did not ask for return_token_ids)")
            continue
        if logprobs is None or len(logprobs) != len(ids):
            out.skipped.append(f"{where}: the capture has no logprobs for its {len(ids)} tokens")
            continue
        out.records.append(
            RolloutRecord(
                id=f"feedback:{where}",
                group_id=prompt_key(item),
                source="production",
                task="feedback",
                messages=capture.messages,
                prompt=capture.prompt if isinstance(capture.prompt, str) else "",
                completion=capture.responses[i],
                prompt_token_ids=capture.prompt_token_ids,
                completion_token_ids=ids,
                behavior_logprobs=logprobs,
                policy_versions=capture.policy_versions or [capture.policy_version or 0],
                rewards=[Reward(name=REWARD_NAME, value=item.reward, details=_details(item))],
                reward=item.reward,
                finish_reason=capture.finish_reasons[i] if i < len(capture.finish_reasons) else None,
                sampling=capture.sampling,
            )
        )
    return out


def _details(item: FeedbackRecord) -> dict[str, Any]:
    details: dict[str, Any] = {"rating": item.rating, "completion_id": item.completion_id}
    if item.comment:
        details["comment"] = item.comment
    return details


def _prompt_fields(item: FeedbackRecord) -> dict[str, Any] | None:
    capture = item.capture
    if capture.messages is not None:
        return {"messages": capture.messages}
    if isinstance(capture.prompt, str):
        return {"prompt": capture.prompt}
    return None  # token-id prompts have no text to template


def feedback_pairs(items: list[FeedbackRecord]) -> list[dict[str, Any]]:
    """Preference pairs ({"messages" | "prompt", "chosen", "rejected", "id"}) from the ratings."""
    by_prompt: dict[str, list[FeedbackRecord]] = {}
    pairs = []
    for item in items:
        prompt = _prompt_fields(item)
        if prompt is None:
            continue
        answer = item.capture.responses[item.choice_index]
        if item.preferred and item.preferred != answer:
            pairs.append(
                {
                    **prompt,
                    "chosen": item.preferred,
                    "rejected": answer,
                    "id": f"preferred:{item.completion_id}/{item.choice_index}",
                }
            )
        by_prompt.setdefault(prompt_key(item), []).append(item)
    for group in by_prompt.values():
        for a in group:
            for b in group:
                answer_a = a.capture.responses[a.choice_index]
                answer_b = b.capture.responses[b.choice_index]
                if a.reward > b.reward and answer_a != answer_b:
                    pairs.append(
                        {
                            **_prompt_fields(a),
                            "chosen": answer_a,
                            "rejected": answer_b,
                            "id": f"rated:{a.completion_id}/{a.choice_index}>{b.completion_id}/{b.choice_index}",
                        }
                    )
    return pairs
