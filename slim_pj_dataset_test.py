"""Tests for slim_pj_dataset: local JSONL/Parquet files in the SlimPajama schema, loaded through `datasets`."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import slim_pj_dataset as spj
from cli import DataError
from data_utils_test import hf_offline  # noqa: F401  (fixture)

DOCS = [
    {"text": "The quick brown fox jumps over the lazy dog. " * 3, "meta": {"redpajama_set_name": "RedPajamaC4"}},
    {"text": "def f(x):\n    return x * 2\n", "meta": {"redpajama_set_name": "RedPajamaGithub"}},
    {"text": "   ", "meta": {"redpajama_set_name": "RedPajamaCommonCrawl"}},  # skipped: empty
    {"text": "Ünïcödé text from a book, long enough to make a prompt from.", "meta": {"redpajama_set_name": "RedPajamaBook"}},
    {"text": "short", "meta": {"redpajama_set_name": "RedPajamaWikipedia"}},
]
TEXTS = [d["text"] for d in DOCS if d["text"].strip()]


@pytest.fixture
def jsonl_file(tmp_path):
    p = tmp_path / "chunk_0.jsonl"
    p.write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in DOCS) + "\n", encoding="utf-8")
    return str(p)


@pytest.fixture
def parquet_file(tmp_path):
    p = tmp_path / "train-00000.parquet"
    pq.write_table(pa.Table.from_pylist(DOCS), p)
    return str(p)


def test_load_jsonl_and_parquet(jsonl_file, parquet_file, hf_offline):  # noqa: F811
    skip = dict(cache_dir=hf_offline, skip_bad_lines=True)  # DOCS has an empty text: a user's file is read strictly
    assert spj.load_texts(data_files=jsonl_file, **skip) == TEXTS
    assert spj.load_texts(data_files=[parquet_file], **skip) == TEXTS
    assert spj.load_texts(data_files=jsonl_file, max_docs=2, cache_dir=hf_offline) == TEXTS[:2]
    assert spj.load_texts(data_files=jsonl_file, streaming=True, max_docs=2, cache_dir=hf_offline) == TEXTS[:2]
    with pytest.raises(DataError, match=r"^--data_files: line 3 of .*chunk_0\.jsonl has an empty or missing 'text'"):
        spj.load_texts(data_files=jsonl_file, cache_dir=hf_offline)
    with pytest.raises(DataError, match=r"^--data_files: row 3 of .*\.parquet has an empty or missing 'text'"):
        spj.load_texts(data_files=[parquet_file], cache_dir=hf_offline)


def test_load_errors(tmp_path, jsonl_file, parquet_file, hf_offline):  # noqa: F811
    p = tmp_path / "no_text.jsonl"
    p.write_text(json.dumps({"content": "x", "meta": {}}) + "\n")
    with pytest.raises(DataError, match=r"^--data_files: .*no_text\.jsonl has no 'text' column \(it has 'content', 'meta'\)\.$"):
        spj.load_texts(data_files=str(p), cache_dir=hf_offline)
    with pytest.raises(DataError, match="mixes JSON and Parquet"):
        spj.load_texts(data_files=[jsonl_file, parquet_file], cache_dir=hf_offline)
    p = tmp_path / "empty.jsonl"
    p.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match=r"has no non-empty 'text' documents"):
        spj.load_texts(data_files=str(p), cache_dir=hf_offline, skip_bad_lines=True)
    with pytest.raises(DataError, match=r"^--dataset_id: could not load 'no-such-org/no-such-slimpajama'"):
        spj.load_texts("no-such-org/no-such-slimpajama", max_docs=3, cache_dir=hf_offline)


def test_training_sequences(tiny_tokenizer):
    blocks = spj.training_sequences(tiny_tokenizer, TEXTS, seq_len=16)
    stream = torch.cat([b["input_ids"] for b in blocks])
    eos = tiny_tokenizer.eos_token_id
    n_tokens = sum(len(tiny_tokenizer(t)["input_ids"]) + 1 for t in TEXTS)
    assert len(blocks) == n_tokens // 16 and all(b["input_ids"].shape == (16,) for b in blocks)
    assert all(b["loss_mask"].all() for b in blocks)
    assert tiny_tokenizer.decode(stream, skip_special_tokens=False).startswith(TEXTS[0] + "<|im_end|>" + TEXTS[1] + "<|im_end|>")
    assert (stream == eos).sum() >= 2


def test_evaluation_prompts(tiny_tokenizer):
    prompts = spj.evaluation_prompts(tiny_tokenizer, TEXTS, num_prompts=10, max_prompt_tokens=20)
    assert len(prompts) == 3  # "short" has no text left after 20 tokens
    for p in prompts:
        assert set(p) == {"id", "input_ids", "text"} and p["input_ids"].shape == (1, 20)
        assert TEXTS[int(p["id"])].startswith(p["text"])
    again = spj.evaluation_prompts(tiny_tokenizer, TEXTS, num_prompts=2, max_prompt_tokens=20)
    assert [p["id"] for p in again] == [p["id"] for p in prompts[:2]]
