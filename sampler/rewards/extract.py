"""Answer extraction from free-form completions: shared by the math, exact-match and gym scorers.

Order of preference ('auto'): the last \\boxed{...}, the last <answer>...</answer>, the last
'Answer: x' line, then the last number in the text. Models rarely follow a format perfectly,
so the lenient fallbacks give a learning signal where the strict format would give none.
"""

from __future__ import annotations

import re
from typing import Literal

AnswerFormat = Literal["auto", "boxed", "answer_tag", "answer_line", "last_number", "none"]

_ANSWER_LINE = re.compile(r"(?:final\s+)?answer\s*(?:is)?\s*[:=]\s*(.+)", re.IGNORECASE)
_ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def strip_think(text: str) -> str:
    """Drop a leading <think>...</think> block: the answer is what follows the reasoning."""
    end = text.rfind("</think>")
    return text[end + len("</think>") :] if end >= 0 else text


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), with nested braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i : j - 1].strip() if depth == 0 else None


def answer_tag(text: str) -> str | None:
    found = _ANSWER_TAG.findall(text)
    return found[-1].strip() if found else None


def answer_line(text: str) -> str | None:
    found = _ANSWER_LINE.findall(text)
    if not found:
        return None
    value = found[-1].strip().rstrip(".").strip()
    return value.strip("$ ").strip("*").strip() or None


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


_EXTRACTORS = {"boxed": last_boxed, "answer_tag": answer_tag, "answer_line": answer_line, "last_number": last_number}


def extract_answer(text: str, fmt: AnswerFormat = "auto") -> tuple[str | None, str]:
    """(answer or None, which extractor found it)."""
    text = strip_think(text)
    if fmt == "none":
        return text.strip(), "none"
    order = ["boxed", "answer_tag", "answer_line", "last_number"] if fmt == "auto" else [fmt]
    for name in order:
        value = _EXTRACTORS[name](text)
        if value is not None:
            return value, name
    return None, "none"
