"""trainer/data.py: templating masks, packing layout, batching, and bad input naming file and line."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from flywheel.sampler.record import RolloutRecord
from flywheel.trainer.data import (
    DataError,
    collate,
    load_dpo,
    load_rollouts,
    load_sft,
    load_text,
    micro_batches,
    rollout_sample,
    take_step,
)
from flywheel.trainer.policy_interface import IGNORE


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


def test_sft_mask_covers_assistant_turns_only(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": CONVERSATION}])
    [sample] = load_sft(path, tokenizer, max_len=256)
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(sample.tokens) == full
    masked = [t for t, m in zip(sample.tokens, sample.loss_mask) if m]
    # exactly the two assistant replies with their end-of-turn markers, nothing of system/user/headers
    assert tokenizer.decode(masked) == "Hello there!<|im_end|>\n4<|im_end|>\n"
    unmasked = tokenizer.decode([t for t, m in zip(sample.tokens, sample.loss_mask) if not m])
    assert "Hi" in unmasked and "Be brief." in unmasked and "Hello" not in unmasked


def test_dpo_pairs_share_prompt_and_mask_the_reply(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": "Say yes", "chosen": "yes", "rejected": "no way"}])
    [pair] = load_dpo(path, tokenizer, max_len=256)

    def decode_masked(s):
        return tokenizer.decode([t for t, m in zip(s.tokens, s.loss_mask) if m])

    assert decode_masked(pair.chosen) == "yes<|im_end|>\n"
    assert decode_masked(pair.rejected) == "no way<|im_end|>\n"
    n = pair.chosen.loss_mask.index(True)
    assert pair.chosen.tokens[:n] == pair.rejected.tokens[:n]


def test_cpt_packing_keeps_documents_apart(tmp_path, tokenizer):
    path = tmp_path / "docs.txt"
    path.write_text("first document here\n\nsecond one, a little longer than the first\n")
    samples = load_text(path, tokenizer, max_len=64)
    assert len(samples) == 2 and all(s.tokens[-1] == tokenizer.eos_token_id for s in samples)
    batch = collate(samples, pad_id=0)
    n0, n1 = len(samples[0].tokens), len(samples[1].tokens)
    assert batch.input_ids.shape == (1, n0 + n1)
    assert batch.position_ids[0].tolist() == list(range(n0)) + list(range(n1))
    # the last token of document 0 predicts nothing: no target crosses the boundary
    assert batch.targets[0, n0 - 1].item() == IGNORE
    assert batch.targets[0, : n0 - 1].tolist() == samples[0].tokens[1:]
    assert batch.targets[0, n0 : n0 + n1 - 1].tolist() == samples[1].tokens[1:]
    assert batch.seq_index[0, 0].item() == 0 and batch.seq_index[0, n0].item() == 1


def test_long_cpt_documents_are_chunked(tmp_path, tokenizer):
    text = "word " * 99 + "word"
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": text}])
    samples = load_text(path, tokenizer, max_len=16)
    assert all(len(s.tokens) <= 16 for s in samples)
    expected = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert [t for s in samples for t in s.tokens] == expected


def test_padded_rows_are_their_own_document(tokenizer):
    from flywheel.trainer.data import Sample

    a, b = Sample([1, 2, 3, 4], [True] * 4), Sample([5, 6], [True] * 2)
    batch = collate([a, b], pad_id=9, pack=False)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 9, 9]]
    assert batch.position_ids[1].tolist() == [0, 1, 0, 1]  # padding restarts: nothing attends into it
    assert batch.targets[1].tolist() == [6, IGNORE, IGNORE, IGNORE]


def test_rollout_sample_aligns_behaviour_logprobs_with_targets():
    record = RolloutRecord(
        prompt_token_ids=[10, 11, 12], completion_token_ids=[20, 21], behavior_logprobs=[-0.5, -1.5], reward=1.0
    )
    batch = collate([rollout_sample(record, advantage=2.0, max_len=64)], pad_id=0)
    # position 2 (last prompt token) predicts completion token 0 with its behaviour logprob
    assert batch.targets[0].tolist() == [IGNORE, IGNORE, 20, 21, IGNORE]
    assert batch.behavior_logprobs[0, 2:4].tolist() == [-0.5, -1.5]
    assert batch.advantages[0, 2:4].tolist() == [2.0, 2.0]


def test_micro_batches_respect_token_budget():
    from flywheel.trainer.data import Sample

    samples = [Sample([0] * n, [True] * n) for n in (5, 4, 3, 8, 1)]
    groups = micro_batches(samples, token_budget=9)
    assert [[len(s.tokens) for s in g] for g in groups] == [[5, 4], [3], [8, 1]]


def test_take_step_is_deterministic_and_covers_each_epoch():
    seen = [i for step in range(5) for i in take_step(10, step, 2, seed=3)]
    assert sorted(seen) == list(range(10))
    assert take_step(10, 7, 3, seed=3) == take_step(10, 7, 3, seed=3)
    assert take_step(10, 0, 10, seed=3) != take_step(10, 0, 10, seed=4)


# ---------------------------------------------------------------- bad input: file and line in the message


def test_wrong_shape_line_names_file_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": CONVERSATION}, {"prompt": "no messages here"}])
    with pytest.raises(DataError, match=r"sft\.jsonl:2: expected an object with 'messages'"):
        load_sft(path, tokenizer, max_len=256)


def test_not_json_line_names_file_and_line(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "{not json"])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_text(path, tokenizer, max_len=64)


def test_empty_dataset_is_refused(tmp_path, tokenizer):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty dataset"):
        load_sft(path, tokenizer, max_len=64)
    with pytest.raises(DataError, match="file not found"):
        load_sft(tmp_path / "missing.jsonl", tokenizer, max_len=64)


def test_conversation_without_assistant_turn_is_refused(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"sft\.jsonl:1: no assistant message"):
        load_sft(path, tokenizer, max_len=64)


def test_rollout_with_mismatched_logprobs_names_file_and_line(tmp_path):
    good = RolloutRecord(prompt_token_ids=[1], completion_token_ids=[2, 3], behavior_logprobs=[-1.0, -2.0])
    bad = good.model_dump(mode="json") | {"behavior_logprobs": [-1.0]}
    path = write_jsonl(tmp_path / "rollouts.jsonl", [good.to_json(), bad])
    with pytest.raises(
        DataError, match=r"rollouts\.jsonl:2: .*behavior_logprobs has 1 entries for 2 completion tokens"
    ):
        load_rollouts(path)


def test_dpo_pair_missing_rejected_is_refused(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "dpo.jsonl", [{"prompt": "x", "chosen": "y"}])
    with pytest.raises(DataError, match=r"dpo\.jsonl:1: expected an object with 'chosen' and 'rejected'"):
        load_dpo(path, tokenizer, max_len=64)
