"""Versioned msgpack framing of a pydantic record: the one encoder/decoder of the capture and rollout formats.

    to_msgpack(record)                      a msgpack map of the record's fields (JSON-mode values)
    from_msgpack(data, Error)               the decoded object, or Error("not msgpack: ...")
    validate_versioned(Cls, obj, ...)       a Cls from a decoded map, or Error saying why not

A format owner (server/capture.py's CapturedRequest, sampler/record.py's RolloutRecord) keeps its
own schema version, error type and name; a payload from an unknown schema version is refused,
never half-read. In server/ because server/ owns the capture format and sampler/ may import it.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

Record = TypeVar("Record", bound=BaseModel)


def to_msgpack(record: BaseModel) -> bytes:
    return msgpack.packb(record.model_dump(mode="json"), use_bin_type=True)


def from_msgpack(data: bytes, error: type[Exception]) -> Any:
    try:
        return msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise error(f"not msgpack: {exc}") from None


def validate_versioned(
    cls: type[Record], obj: Any, *, what: str, schema_version: int, error: type[Exception]
) -> Record:
    """`obj` (a decoded map) as a `cls` of `schema_version`; `error` names `what` and the first problem."""
    if not isinstance(obj, dict):
        raise error(f"a {what} must be a map, got {type(obj).__name__}")
    if obj.get("schema_version") != schema_version:
        raise error(f"{what} schema_version {obj.get('schema_version')!r} is not supported (expected {schema_version})")
    try:
        return cls.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise error(f"invalid {what} field {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
