"""Reading JSON Lines files: the one loop over a file's lines that every JSONL reader uses.

    for number, value in json_lines(path): ...      strict: a bad line raises JSONLineError
    read_json_lines(path, skip_bad=True)            tolerant, for a file another process is appending
                                                    to (its last line may be half written)

Blank lines are skipped. Callers word their own errors (a trainer data file, a prompts file and an
eval history each say what is wrong in their terms) from JSONLineError's `where` and `error`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class JSONLineError(ValueError):
    """A line of a JSONL file that is not JSON: `where` is 'path:number', `error` the JSONDecodeError."""

    def __init__(self, path: Path, number: int, error: json.JSONDecodeError):
        super().__init__(f"{path}:{number}: not JSON ({error.msg})")
        self.where, self.number, self.error = f"{path}:{number}", number, error


def json_lines(path: str | Path, skip_bad: bool = False) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line. A line that is not JSON raises JSONLineError,
    or with skip_bad is left out (and undecodable bytes are replaced, not raised)."""
    path = Path(path)
    with path.open(errors="replace" if skip_bad else "strict") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                if skip_bad:
                    continue  # e.g. the line another process is writing right now
                raise JSONLineError(path, number, exc) from None


def read_json_lines(path: str | Path, skip_bad: bool = False) -> list[Any]:
    """Every line's value (see json_lines)."""
    return [value for _, value in json_lines(path, skip_bad)]
