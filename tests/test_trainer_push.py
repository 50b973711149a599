"""The trainer pushes its weights to a real `flywheel serve` every K steps; the server then serves them.

Uses its own server (the session `server` fixture must stay at version 0 for other tests).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from flywheel.clients.servers import start_server
from flywheel.trainer.config import TrainConfig
from flywheel.trainer.train import train

PROMPT = "Once upon a time"


def sample_with_logprobs(server, prompt: str) -> tuple[list[int], torch.Tensor]:
    """8 seeded temperature-1 tokens from the server: their ids and the server's logprobs of them."""
    reply = httpx.post(
        server.base_url + "/completions",
        timeout=60,
        json={
            "model": server.model,
            "prompt": prompt,
            "max_tokens": 8,
            "temperature": 1.0,
            "seed": 0,
            "logprobs": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    ).json()
    choice = reply["choices"][0]
    return choice["token_ids"], torch.tensor(choice["logprobs"]["token_logprobs"])


def hf_logprobs(path, prompt_ids: list[int], ids: list[int]) -> torch.Tensor:
    """HF log-probabilities of `ids` after `prompt_ids` under the model folder at `path`."""
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        logp = model(torch.tensor([prompt_ids + ids])).logits[0, len(prompt_ids) - 1 : -1].log_softmax(-1)
    return logp.gather(-1, torch.tensor(ids)[:, None])[:, 0]


@pytest.mark.slow  # starts its own vLLM server (~1 min, plus waiting for the one-server lock)
def test_push_every_k_steps_serves_the_trained_weights(tmp_path, tiny_model):
    data = tmp_path / "sft.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "the end " * 4}]}
            )
            + "\n"
            for i in range(4)
        )
    )
    # vLLM's ZMQ socket paths live under the server's data dir and must stay < 108 characters
    serve_dir = Path(tempfile.mkdtemp(prefix="fwpush", dir="/tmp"))
    with start_server(tiny_model, serve_dir) as server:
        config = TrainConfig(
            objective="sft",
            model=str(tiny_model),
            data=[str(data)],
            run_dir=tmp_path / "run",
            max_seq_len=64,
            micro_batch_tokens=128,
            batch_size=4,
            lr=5e-3,
            max_steps=4,
            save_every=0,
            push_every=2,
            push_url=server.base_url,
            admin_token=server.admin_token,
        )
        state = train(config)
        assert state.pushed_version == 2
        status = httpx.get(server.url + "/flywheel/status", timeout=10).json()
        assert status["policy_version"] == 2
        rows = [json.loads(line) for line in (config.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r.get("pushed_version") for r in rows] == [None, 1, None, 2]
        ckpt = config.run_dir / "checkpoints" / "step_000004"
        assert json.loads((ckpt / "trainer_state" / "state.json").read_text())["pushed_version"] == 2

        served_ids, served_logprobs = sample_with_logprobs(server, PROMPT)
    shutil.rmtree(serve_dir, ignore_errors=True)

    prompt_ids = AutoTokenizer.from_pretrained(ckpt)(PROMPT)["input_ids"]

    def logprobs_of(path):
        return hf_logprobs(path, prompt_ids, served_ids)

    # the server runs the weights of the last push (= the final checkpoint), not the ones it started with
    torch.testing.assert_close(served_logprobs, logprobs_of(ckpt), atol=0.01, rtol=0)
    assert (served_logprobs - logprobs_of(tiny_model)).abs().max() > 0.1
