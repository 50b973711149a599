"""Rewards: scorers shared by the sampler (rewards) and the eval client (metrics).

API
    get_scorer(name, **options) -> scorer        build a registered scorer (or a dotted-path user function)
    register_scorer(name)                        decorator for a factory `(**options) -> scorer`
    list_scorers() -> [names]
    WeightedScorer([RewardSpec | dict, ...])     several terms; .score_all(...) -> [Reward], __call__ -> summed Reward

A scorer is a callable `(completion: str, answer: Any, **context) -> sampler.record.Reward`.
`answer` is the reference (a number/string, a HumanEval problem dict, a reasoning-gym entry, ...);
`context` carries what the sampler knows about the rollout: prompt, messages, task,
completion_token_ids, finish_reason. Scorers ignore context keys they do not use.

Registered scorers (options in brackets)
    math_verify      math-verify equivalence of the extracted answer      [answer_format='auto', timeout_s=5]
    exact_match      normalised string equality (answer may be a list)    [answer_format='auto', case_sensitive=False]
    regex            pattern matches / a group equals the answer          [pattern, group=None, flags='']
    multiple_choice  picked letter equals the answer (letter or index)    [choices='ABCD']
    code_exec        HumanEval tests pass in a sandboxed subprocess       [timeout_s=5.0, memory_mb=1024]
    format_think     '<think>...</think>' then an answer                  [answer_pattern=None,
                                                                           think_opened_in_prompt=False]
    format_regex     whole completion matches a pattern                   [pattern]
    length_penalty   0 to -1 between target and limit length              [target=256, limit=1024, unit='tokens',
                                                                           truncated_penalty=1.0]
    reasoning_gym    the reasoning-gym task's own score_answer             [task=None, answer_format='auto']
    http             remote reward server / LLM judge (JSON protocol)     [url, timeout_s=30, retries=3, backoff_s=0.5,
                                                                           headers, fallback, name]
    weighted         weighted sum of other scorers                        [scorers=[{'name', 'weight', 'options'}]]
    python           user function by dotted path                         [path, **extra context]
A name with ':' or '.' that is not registered is loaded as a user function 'package.module:function';
the function may return a Reward, a number or {'value': x, 'details': {...}}.

Answer extraction ('auto'): last \\boxed{}, last <answer></answer>, last 'Answer: x', last number;
a leading <think>...</think> block is ignored (sampler.rewards.extract).
"""

from flywheel.sampler.rewards import code, gym, match, remote, shape  # noqa: F401  (register the built-in scorers)
from flywheel.sampler.rewards.combine import RewardSpec, WeightedScorer
from flywheel.sampler.rewards.registry import (
    Scorer,
    ScorerError,
    get_scorer,
    list_scorers,
    load_object,
    register_scorer,
)

__all__ = [
    "Scorer",
    "ScorerError",
    "get_scorer",
    "list_scorers",
    "load_object",
    "register_scorer",
    "RewardSpec",
    "WeightedScorer",
]
