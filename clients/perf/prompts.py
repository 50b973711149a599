"""Prompts for load tests: synthetic ones of an exact token length, or the prompts of a benchmark.

Token-exact synthetic prompts: random token ids are decoded to text and re-encoded; text that does
not round-trip to the asked length is trimmed/extended and tried again. The tokenizer is either a
local HF folder (`--tokenizer PATH`, the served model's) or the server's own `/tokenize` and
`/detokenize` routes (vLLM's), so the count is the served model's count, not an estimate.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

import httpx


@dataclass
class Prompt:
    text: str
    input_len: int  # tokens, by the tokenizer that built it (or the server's usage for dataset prompts)
    output_len: int  # max_tokens to ask for


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    @property
    def vocab_size(self) -> int: ...


class LocalTokenizer:
    """An HF tokenizer folder (the served model's), used without special tokens."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size


class ServerTokenizer:
    """vLLM's /tokenize and /detokenize routes (at the server root, next to /v1)."""

    def __init__(self, server_url: str, model: str, vocab_size: int = 32000):
        self._client = httpx.Client(base_url=server_url, timeout=30)
        self._model = model
        self._vocab = vocab_size

    def encode(self, text: str) -> list[int]:
        r = self._client.post("/tokenize", json={"model": self._model, "prompt": text, "add_special_tokens": False})
        r.raise_for_status()
        return r.json()["tokens"]

    def decode(self, ids: list[int]) -> str:
        r = self._client.post("/detokenize", json={"model": self._model, "tokens": ids})
        r.raise_for_status()
        return r.json()["prompt"]

    @property
    def vocab_size(self) -> int:
        return self._vocab


def exact_length_text(tok: Tokenizer, n: int, rng: random.Random, low: int = 1000) -> str:
    """Text that the tokenizer encodes to exactly n tokens."""
    high = max(low + 1, min(tok.vocab_size, 100_000))  # ordinary BPE ids: no special or added tokens
    ids = [rng.randrange(low, high) for _ in range(n)]
    for _ in range(20):
        text = tok.decode(ids)
        got = tok.encode(text)
        if len(got) == n:
            return text
        # Re-encoding merged or split some pieces: keep the round-tripped ids, pad or trim to n.
        ids = got[:n] + [rng.randrange(low, high) for _ in range(n - len(got))]
    raise RuntimeError(f"could not build a prompt of exactly {n} tokens after 20 tries")


def synthetic_prompts(tok: Tokenizer, num: int, input_len: int, output_len: int, seed: int = 0) -> list[Prompt]:
    rng = random.Random(seed)
    return [Prompt(exact_length_text(tok, input_len, rng), input_len, output_len) for _ in range(num)]


def dataset_prompts(name: str, num: int, output_len: int, seed: int = 0) -> list[Prompt]:
    """Prompts of an eval benchmark (clients.eval.datasets), cycled to `num`; input_len comes from usage."""
    from flywheel.clients.eval.datasets import load_benchmark

    items = load_benchmark(name)
    random.Random(seed).shuffle(items)
    return [Prompt(items[i % len(items)].prompt, 0, output_len) for i in range(num)]
