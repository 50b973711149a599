"""Training data: JSONL/text loaders, chat templating with assistant-only loss, packing, batching.

Everything becomes a `Sample`: a token sequence with a token-aligned loss mask (mask[j] says
"token j is a target"), plus behaviour logprobs and an advantage for RL. `collate` turns a list of
samples into the backend batch layout of trainer/policy_interface.py: documents packed in one row with
position ids restarting at 0 at every document start, so no token attends across documents.

File formats (one JSON object per line; blank lines are skipped):
    sft:      {"messages": [{"role": ..., "content": ...}, ...]}            loss on assistant turns
    dpo:      {"prompt": str | "messages": [...], "chosen": str | message, "rejected": str | message}
    cpt:      {"text": str} per line (.jsonl), or a plain .txt file where blank lines separate documents
    rollouts: sampler.record.RolloutRecord JSON lines                        loss on completion tokens
Bad input raises DataError naming the file and line.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flywheel.sampler.record import RecordError, RolloutRecord
from flywheel.server.jsonl import JSONLineError, json_lines
from flywheel.trainer.policy_interface import IGNORE


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and line."""


@dataclass
class Sample:
    """One document/conversation/completion as token ids."""

    tokens: list[int]
    loss_mask: list[bool]  # loss_mask[j]: token j is predicted (counted in the loss)
    logprobs: list[float] | None = None  # token-aligned behaviour logprobs (0.0 where not a completion token)
    advantage: float = 0.0
    key: str = ""  # idempotency/debug key: record id or "file:line"
    lag: int = 0  # RL: policy versions the rollout is behind the learner's last push (mismatch metrics per lag)


@dataclass
class PreferencePair:
    chosen: Sample
    rejected: Sample
    key: str = ""


def read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield ("file:line", object) for each non-blank line; refuse non-JSON lines and empty files."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    found = False
    try:
        for n, obj in json_lines(path):
            found = True
            yield f"{path}:{n}", obj
    except JSONLineError as exc:
        raise DataError(f"{exc.where}: not valid JSON ({exc.error.msg})") from None
    if not found:
        raise DataError(f"{path}: empty dataset (no JSON lines)")


# ---------------------------------------------------------------- chat templating


def _check_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be an object with string 'role' and 'content', got {m!r:.80}")
    return messages


def chat_sample(tokenizer, messages: list[dict], where: str, train_on: str = "all") -> Sample:
    """Template a conversation; the loss mask covers assistant turns only (train_on='last': the final one).

    The template is rendered once in full; each assistant turn's character span is found by
    rendering the conversation up to it (with the generation prompt) and up to its end, and tokens
    are mapped to spans through the tokenizer's offsets, so templating never re-splits tokens.
    """

    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(messages, False)
    spans = []
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last":
        assistant_turns = assistant_turns[-1:]
    for i in assistant_turns:
        before = render(messages[:i], True) if i > 0 else ""
        upto = render(messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError(
                f"{where}: the chat template does not render conversations prefix-wise; "
                f"cannot locate assistant turn {i}"
            )
        spans.append((len(before), len(upto)))
    if not spans:
        raise DataError(f"{where}: no assistant message to train on")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(a <= start < b for a, b in spans) for start, _ in enc["offset_mapping"]]
    return Sample(tokens=list(enc["input_ids"]), loss_mask=mask, key=where)


def _truncate(sample: Sample, max_len: int) -> Sample:
    if len(sample.tokens) <= max_len:
        return sample
    logprobs = sample.logprobs[:max_len] if sample.logprobs is not None else None
    return Sample(
        sample.tokens[:max_len], sample.loss_mask[:max_len], logprobs, sample.advantage, sample.key, sample.lag
    )


def _require_tokens(sample: Sample, where: str) -> Sample:
    if not any(sample.loss_mask[1:]):
        raise DataError(f"{where}: nothing to train on (no target tokens after templating/truncation)")
    return sample


# ---------------------------------------------------------------- loaders


def load_sft(path: Path, tokenizer, max_len: int) -> list[Sample]:
    out = []
    for where, obj in read_jsonl(path):
        if not isinstance(obj, dict) or "messages" not in obj:
            raise DataError(f"{where}: expected an object with 'messages' (SFT), got {str(obj)[:80]}")
        sample = chat_sample(tokenizer, _check_messages(obj["messages"], where), where)
        out.append(_require_tokens(_truncate(sample, max_len), where))
    return out


def _text_documents(path: Path) -> Iterator[tuple[str, str]]:
    if Path(path).suffix == ".txt":
        if not Path(path).exists():
            raise DataError(f"{path}: file not found")
        blocks = [b.strip() for b in Path(path).read_text().split("\n\n")]
        docs = [(f"{path}:doc{i}", b) for i, b in enumerate(blocks) if b]
        if not docs:
            raise DataError(f"{path}: empty dataset (no text)")
        yield from docs
        return
    for where, obj in read_jsonl(path):
        text = obj.get("text") if isinstance(obj, dict) else obj
        if not isinstance(text, str) or not text:
            raise DataError(f'{where}: expected {{"text": non-empty string}} (CPT), got {str(obj)[:80]}')
        yield where, text


def load_text(path: Path, tokenizer, max_len: int) -> list[Sample]:
    """CPT documents, each ended by EOS and cut into chunks of at most max_len tokens."""
    out = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for where, text in _text_documents(path):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + eos
        for start in range(0, len(ids), max_len):
            chunk = ids[start : start + max_len]
            if len(chunk) > 1:
                out.append(Sample(chunk, [True] * len(chunk), key=f"{where}+{start}"))
    return out


def _as_message(value: Any, where: str, name: str) -> dict:
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    if isinstance(value, dict) and value.get("role") == "assistant" and isinstance(value.get("content"), str):
        return value
    raise DataError(f"{where}: '{name}' must be a string or an assistant message, got {str(value)[:80]}")


def load_dpo(path: Path, tokenizer, max_len: int) -> list[PreferencePair]:
    return [dpo_pair(obj, tokenizer, max_len, where) for where, obj in read_jsonl(path)]


def dpo_pair(obj: Any, tokenizer, max_len: int, where: str) -> PreferencePair:
    """One object of the dpo shape (a file line, or a pair built from user feedback) as a PreferencePair."""
    if not isinstance(obj, dict) or "chosen" not in obj or "rejected" not in obj:
        raise DataError(f"{where}: expected an object with 'chosen' and 'rejected' (DPO), got {str(obj)[:80]}")
    if isinstance(obj.get("messages"), list):
        prompt = _check_messages(obj["messages"], where)
    elif isinstance(obj.get("prompt"), str):
        prompt = [{"role": "user", "content": obj["prompt"]}]
    else:
        raise DataError(f"{where}: a DPO pair needs 'prompt' (string) or 'messages' (list)")
    sides = [
        chat_sample(tokenizer, prompt + [_as_message(obj[k], where, k)], where, train_on="last")
        for k in ("chosen", "rejected")
    ]
    chosen, rejected = (_require_tokens(_truncate(s, max_len), where) for s in sides)
    return PreferencePair(chosen, rejected, key=where)


def load_rollouts(path: Path) -> list[RolloutRecord]:
    out = []
    for where, obj in read_jsonl(path):
        try:
            out.append(RolloutRecord.from_obj(obj))
        except RecordError as exc:
            raise DataError(f"{where}: {exc}") from None
    return out


def rollout_sample(record: RolloutRecord, advantage: float, max_len: int, lag: int = 0) -> Sample:
    """Prompt + completion ids exactly as the server saw/produced them; loss on completion tokens."""
    if not record.completion_token_ids:
        raise DataError(f"record {record.id}: empty completion")
    if record.behavior_logprobs is None:
        raise DataError(f"record {record.id}: no behavior_logprobs (GRPO needs the sampler's logprobs)")
    p, c = len(record.prompt_token_ids), len(record.completion_token_ids)
    sample = Sample(
        tokens=list(record.prompt_token_ids) + list(record.completion_token_ids),
        loss_mask=[False] * p + [True] * c,
        logprobs=[0.0] * p + list(record.behavior_logprobs),
        advantage=advantage,
        key=record.id,
        lag=lag,
    )
    return _truncate(sample, max_len)


# ---------------------------------------------------------------- batching


def shuffled_order(n: int, epoch: int, seed: int) -> list[int]:
    """The sample order of one epoch: a pure function of (n, epoch, seed), so a resumed run replays it."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def take_step(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """Indices of the samples optimizer step `step` trains on (epochs wrap around, reshuffled each epoch)."""
    if n == 0:
        raise DataError("empty dataset")
    out = []
    for k in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(k, n)
        out.append(shuffled_order(n, epoch, seed)[i])
    return out


def micro_batches(samples: list, token_budget: int, size=lambda s: len(s.tokens)) -> list[list]:
    """Greedy, order-preserving split into groups of at most `token_budget` tokens (one oversized item stands alone)."""
    groups: list[list] = [[]]
    used = 0
    for s in samples:
        n = size(s)
        if groups[-1] and used + n > token_budget:
            groups.append([])
            used = 0
        groups[-1].append(s)
        used += n
    return [g for g in groups if g]


@dataclass
class Batch:
    """The backend batch layout (trainer/policy_interface.py) plus per-target RL values, all [B, T]."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor  # float 1.0 where targets != IGNORE
    seq_index: torch.Tensor  # index of the sample each target belongs to (into `keys`), -1 elsewhere
    behavior_logprobs: torch.Tensor
    advantages: torch.Tensor
    lag: torch.Tensor  # long: the sample's Sample.lag on its targets, 0 elsewhere
    keys: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def to(self, device: torch.device) -> Batch:
        moved = {
            k: getattr(self, k).to(device)
            for k in (
                "input_ids",
                "position_ids",
                "targets",
                "mask",
                "seq_index",
                "behavior_logprobs",
                "advantages",
                "lag",
            )
        }
        return Batch(**moved, keys=self.keys)


def collate(samples: list[Sample], pad_id: int, pack: bool = True, first_index: int = 0) -> Batch:
    """Pack samples into one row (pack=True) or one padded row each. Target t = token t+1 of the same sample.

    `first_index` offsets seq_index so several micro-batches of one step share one numbering.
    """
    rows = [samples] if pack else [[s] for s in samples]
    width = max(sum(len(s.tokens) for s in row) for row in rows)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    targets = torch.full(shape, IGNORE, dtype=torch.long)
    seq = torch.full(shape, -1, dtype=torch.long)
    behavior = torch.zeros(shape)
    adv = torch.zeros(shape)
    lag = torch.zeros(shape, dtype=torch.long)
    index = first_index
    for r, row in enumerate(rows):
        col = 0
        for s in row:
            n = len(s.tokens)
            ids[r, col : col + n] = torch.tensor(s.tokens)
            pos[r, col : col + n] = torch.arange(n)
            nxt = torch.tensor(s.tokens[1:], dtype=torch.long)
            counted = torch.tensor(s.loss_mask[1:], dtype=torch.bool)
            targets[r, col : col + n - 1] = torch.where(counted, nxt, torch.full_like(nxt, IGNORE))
            seq[r, col : col + n - 1] = torch.where(counted, index, -1)
            if s.logprobs is not None:
                behavior[r, col : col + n - 1] = torch.tensor(s.logprobs[1:])
            adv[r, col : col + n - 1] = s.advantage
            lag[r, col : col + n - 1] = s.lag
            col += n
            index += 1
        pos[r, col:] = torch.arange(width - col)  # padding: a document of its own, never a target
    return Batch(
        ids, pos, targets, (targets != IGNORE).float(), seq, behavior, adv, lag, [s.key for row in rows for s in row]
    )
