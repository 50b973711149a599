"""The scorer registry: names -> factories, plus user scorers loaded by dotted path.

A factory takes the scorer's options as keyword arguments and returns the scorer, a callable
`(completion: str, answer: Any, **context) -> Reward`. Building once and calling many times lets
a scorer do its setup (compile a regex, open an HTTP client) only once.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any, Protocol

from flywheel.sampler.record import Reward


class Scorer(Protocol):
    def __call__(self, completion: str, answer: Any, **context: Any) -> Reward: ...


class ScorerError(ValueError):
    """A scorer name or option that cannot be used (unknown name, bad option, unloadable path)."""


_FACTORIES: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str) -> Callable[[Callable[..., Scorer]], Callable[..., Scorer]]:
    """Decorator: register a scorer factory under `name` (re-registering a name replaces it)."""

    def deco(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        _FACTORIES[name] = factory
        return factory

    return deco


def list_scorers() -> list[str]:
    return sorted(_FACTORIES)


def load_object(path: str) -> Any:
    """'package.module:attr' or 'package.module.attr' -> the object."""
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ScorerError(f"{path!r} is not a dotted path like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ScorerError(f"cannot import {module_name!r} for {path!r}: {exc}") from None
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ScorerError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def as_reward(name: str, result: Any) -> Reward:
    """Accept what a user function returns: a Reward, a number/bool, or a dict with 'value'."""
    if isinstance(result, Reward):
        return result
    if isinstance(result, bool | int | float):
        return Reward(name=name, value=float(result))
    if isinstance(result, dict) and "value" in result:
        return Reward(name=result.get("name", name), value=float(result["value"]), details=result.get("details", {}))
    raise ScorerError(
        f"scorer {name!r} returned {type(result).__name__}; expected Reward, a number or a dict with 'value'"
    )


def _user_scorer(path: str, **options: Any) -> Scorer:
    """A user function `(completion, answer, **context)` by dotted path; options become extra context."""
    fn = load_object(path)
    if not callable(fn):
        raise ScorerError(f"{path!r} is not callable")

    def score(completion: str, answer: Any, **context: Any) -> Reward:
        return as_reward(path, fn(completion, answer, **{**context, **options}))

    return score


def get_scorer(name: str, **options: Any) -> Scorer:
    """Build the scorer registered as `name` with `options`.

    A name containing ':' or '.' (not registered) is a dotted path to a user function; the
    registered name 'python' does the same with the path in `path=`.
    """
    if name not in _FACTORIES and (":" in name or "." in name):
        return _user_scorer(name, **options)
    if name not in _FACTORIES:
        raise ScorerError(f"unknown scorer {name!r} (registered: {', '.join(list_scorers())}; or give a dotted path)")
    factory = _FACTORIES[name]
    accepted = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = [k for k in options if k not in accepted and not takes_any]
    if unknown:
        raise ScorerError(f"scorer {name!r} has no option {unknown[0]!r} (options: {', '.join(accepted) or 'none'})")
    return factory(**options)


@register_scorer("python")
def python_scorer(path: str, **options: Any) -> Scorer:
    """User-defined reward: `path` is 'package.module:function'."""
    return _user_scorer(path, **options)
