"""Tests for xsum_dataset: local JSON/JSONL files with document/summary/id, loaded through `datasets`."""
import json

import pytest
import torch

import xsum_dataset as xs
from cli import DataError
from data_utils_test import hf_offline  # noqa: F401  (fixture)

RECORDS = [
    {"document": "The council approved a new bridge over the river on Tuesday.", "summary": "A bridge was approved.", "id": "101"},
    {"document": "Scientists found water ice near the lunar south pole.", "summary": "Ice was found on the Moon.", "id": "102"},
    {"document": "", "summary": "No article.", "id": "103"},  # dropped
    {"document": "A local team won the cup after extra time.", "summary": "Local team wins the cup.", "id": "104"},
]
KEPT = [r for r in RECORDS if r["document"]]


@pytest.fixture
def json_file(tmp_path):
    p = tmp_path / "validation.json"
    p.write_text(json.dumps(RECORDS))
    return str(p)


def test_load_records_json_and_jsonl(tmp_path, json_file, hf_offline):  # noqa: F811
    with pytest.raises(DataError, match=r"^--data_files: line 1 of .*validation\.json has an empty or missing "
                                        r"'document'; fix it, or pass --skip_bad_lines"):
        xs.load_records(data_files=json_file, cache_dir=hf_offline)  # a user's file is read strictly
    assert xs.load_records(data_files=json_file, cache_dir=hf_offline, skip_bad_lines=True) == KEPT
    p = tmp_path / "validation.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    with pytest.raises(DataError, match=r"line 3 of .*validation\.jsonl has an empty or missing 'document'"):
        xs.load_records(data_files=[str(p)], cache_dir=hf_offline)
    assert xs.load_records(data_files=[str(p)], cache_dir=hf_offline, skip_bad_lines=True) == KEPT


def test_load_errors(tmp_path, hf_offline):  # noqa: F811
    p = tmp_path / "no_summary.json"
    p.write_text(json.dumps([{"document": "d", "id": "1"}]))
    with pytest.raises(DataError, match=r"^--data_files: .*no_summary\.json has no 'summary' column"):
        xs.load_records(data_files=str(p), cache_dir=hf_offline)
    with pytest.raises(DataError, match=r"^--data_files: .*absent\.json does not exist\.$"):
        xs.load_records(data_files=str(tmp_path / "absent.json"), cache_dir=hf_offline)
    with pytest.raises(DataError, match=r"^--dataset_id: could not load 'no-such-org/no-such-xsum'"):
        xs.load_records("no-such-org/no-such-xsum", cache_dir=hf_offline)


def test_to_messages():
    assert xs.to_messages(KEPT[0]) == [
        {"role": "user", "content": "Summarize the following article in one sentence.\n\n" + KEPT[0]["document"]},
        {"role": "assistant", "content": KEPT[0]["summary"]},
    ]


def test_training_sequences(tiny_tokenizer):
    blocks = xs.training_sequences(tiny_tokenizer, KEPT, seq_len=8)
    assert all(b["input_ids"].shape == (8,) for b in blocks)
    ids, mask = torch.cat([b["input_ids"] for b in blocks]), torch.cat([b["loss_mask"] for b in blocks]).bool()
    # the last summary may lose its tail to packing; the others must be exactly what is learned
    learned = tiny_tokenizer.decode(ids[mask], skip_special_tokens=False)
    assert learned.startswith("".join(r["summary"] + "<|im_end|>\n" for r in KEPT[:2]))
    every = xs.training_sequences(tiny_tokenizer, KEPT, seq_len=8, assistant_only=False)
    assert all(b["loss_mask"].all() for b in every) and len(every) == len(blocks)


def test_evaluation_prompts(tiny_tokenizer):
    prompts = xs.evaluation_prompts(tiny_tokenizer, KEPT, num_prompts=2, seed=0)
    assert len(prompts) == 2
    for p in prompts:
        record = next(r for r in KEPT if r["id"] == p["id"])
        assert p["text"] == ("<|im_start|>user\nSummarize the following article in one sentence.\n\n"
                             + record["document"] + "<|im_end|>\n<|im_start|>assistant\n")
        assert p["input_ids"].shape[0] == 1 and tiny_tokenizer.decode(p["input_ids"][0]) == p["text"]
    lengths = [p["input_ids"].shape[1] for p in xs.evaluation_prompts(tiny_tokenizer, KEPT, num_prompts=3)]
    limit = min(lengths)  # only the shortest article fits
    assert len(xs.evaluation_prompts(tiny_tokenizer, KEPT, num_prompts=3, max_prompt_tokens=limit)) == 1
