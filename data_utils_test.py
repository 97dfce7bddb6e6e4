"""Tests for data_utils: JSON reading, the assistant mask, packing, splits, and `datasets` loading errors."""
import gzip
import json
import logging
import random

import pytest
import torch

import data_utils
from cli import DataError
from data_utils import (blocks_from_prefix, chat_tokens_with_mask, collate, iter_rows, pack_sequences,
                        read_json_records, sample_blocks, sample_prompts, split_by_id)

RECORDS = [{"id": f"r{i}", "text": f"record number {i} with a \"quote\" and ünïcödé"} for i in range(6)]


@pytest.fixture
def hf_offline(monkeypatch, tmp_path):
    """Keep `datasets` off the network and out of the user's cache; returns a cache_dir to pass along."""
    import datasets
    import huggingface_hub.constants
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return str(cache)


def write_truncated_array(path, records, keep):
    """A pretty-printed JSON array of `records` cut off inside record number `keep` (0-based)."""
    text = json.dumps(records, indent=2, ensure_ascii=False)
    cut = text.index(json.dumps(records[keep]["id"])) + 3  # inside the id string of record `keep`
    path.write_text(text[:cut], encoding="utf-8")


# -----------------------------------------------------------------------------
# read_json_records

def test_truncated_array_keeps_complete_records(tmp_path):
    p = tmp_path / "cut.json"
    write_truncated_array(p, RECORDS, keep=4)
    records, info = read_json_records(str(p))
    assert records == RECORDS[:4]
    assert info == {"kept": 4, "truncated": True, "bad_lines": 0, "lines": [2, 6, 10, 14]}


def test_array_cut_inside_a_multibyte_character(tmp_path):
    p = tmp_path / "cut.json"
    data = json.dumps(RECORDS, ensure_ascii=False).encode("utf-8")
    p.write_bytes(data[:data.rindex("ü".encode()) + 1])  # half of the last "ü"
    records, info = read_json_records(str(p))
    assert records == RECORDS[:5] and info["truncated"]


def test_complete_array_and_non_object_entries(tmp_path):
    p = tmp_path / "ok.json"
    p.write_text(json.dumps(RECORDS[:3] + [7, "x"] + RECORDS[3:]))
    records, info = read_json_records(str(p))
    assert records == RECORDS
    assert info == {"kept": 6, "truncated": False, "bad_lines": 2, "lines": [1] * 6}


@pytest.mark.parametrize("name", ["data.jsonl", "data.json"])
def test_jsonl_with_a_bad_line_and_a_cut_last_line(tmp_path, name):
    lines = [json.dumps(r, ensure_ascii=False) for r in RECORDS]
    lines[2] = lines[2][:10]  # corrupt line in the middle
    p = tmp_path / name
    p.write_text("\n".join(lines[:5]) + "\n\n" + lines[5][:-4], encoding="utf-8")
    records, info = read_json_records(str(p))
    assert records == RECORDS[:2] + RECORDS[3:5]
    assert info == {"kept": 4, "truncated": True, "bad_lines": 1, "lines": [1, 2, 4, 5]}


def test_no_complete_record_is_a_data_error(tmp_path):
    p = tmp_path / "empty.json"
    p.write_text('[\n  {"id": "a", "conv')
    with pytest.raises(DataError, match=r"^--data_files: .*empty\.json contains no complete JSON record\.$"):
        read_json_records(str(p), flag="--data_files")
    p.write_text("[]")
    with pytest.raises(DataError, match="no complete JSON record"):
        read_json_records(str(p))


def test_missing_and_bad_files_are_data_errors(tmp_path):
    with pytest.raises(DataError, match=r"^--data_files: .*nope\.json does not exist\.$"):
        read_json_records(str(tmp_path / "nope.json"), flag="--data_files")
    with pytest.raises(DataError, match="is a directory"):
        read_json_records(str(tmp_path))
    p = tmp_path / "latin1.json"
    p.write_bytes(b'[{"a": "\xe9t\xe9"}, {"b": 1}, {"c": 2}]')
    with pytest.raises(DataError, match="not UTF-8"):
        read_json_records(str(p))


# -----------------------------------------------------------------------------
# chat_tokens_with_mask

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Say ünïcode\nplease"},
    {"role": "assistant", "content": "ünïcode\n\n  indented"},
]

# A Llama-3-like layout (header, blank line, content, end token) written with the tiny tokenizer's specials.
LLAMA3_LIKE = (
    "<|endoftext|>{% for m in messages %}<|im_start|>{{ m['role'] }}<|im_end|>\n\n{{ m['content'] }}<|endoftext|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant<|im_end|>\n\n{% endif %}"
)


def masked_text(tok, ids, mask):
    return tok.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)


def test_assistant_mask_chatml(tiny_tokenizer):
    ids, mask = chat_tokens_with_mask(tiny_tokenizer, CHAT)
    assert ids == tiny_tokenizer(tiny_tokenizer.apply_chat_template(CHAT, tokenize=False), add_special_tokens=False)["input_ids"]
    assert len(mask) == len(ids) and set(mask) == {0, 1}
    # the mask covers each reply plus its "<|im_end|>\n", nothing else
    assert masked_text(tiny_tokenizer, ids, mask) == "Hello! How can I help?<|im_end|>\nünïcode\n\n  indented<|im_end|>\n"
    unmasked = tiny_tokenizer.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=False)
    assert "Hi there" in unmasked and "Be brief." in unmasked and "<|im_start|>assistant\n" in unmasked


def test_assistant_mask_other_template_and_slow_path_agree(tiny_tokenizer, monkeypatch):
    tiny_tokenizer.chat_template = LLAMA3_LIKE
    fast = chat_tokens_with_mask(tiny_tokenizer, CHAT)
    assert masked_text(tiny_tokenizer, *fast) == "Hello! How can I help?<|endoftext|>ünïcode\n\n  indented<|endoftext|>"
    monkeypatch.setattr(data_utils, "_spans_from_pieces", lambda *args: None)  # force the prefix-tokenizing path
    assert chat_tokens_with_mask(tiny_tokenizer, CHAT) == fast


def test_assistant_mask_max_len_and_no_reply(tiny_tokenizer):
    ids, mask = chat_tokens_with_mask(tiny_tokenizer, CHAT)
    short_ids, short_mask = chat_tokens_with_mask(tiny_tokenizer, CHAT, max_len=40)
    assert short_ids == ids[:40] and short_mask == mask[:40]
    ids, mask = chat_tokens_with_mask(tiny_tokenizer, CHAT[:2])
    assert len(ids) > 0 and sum(mask) == 0


# -----------------------------------------------------------------------------
# packing and collation

def test_pack_sequences_drops_only_the_tail():
    seqs = [(list(range(5)), [0, 0, 1, 1, 1]), (list(range(10, 17)), [1] * 7), ([20, 21, 22], [0, 0, 0])]
    blocks = pack_sequences(seqs, seq_len=4)
    assert len(blocks) == 3  # 15 tokens -> 3 blocks of 4, 3 tokens dropped
    assert all(b["input_ids"].shape == (4,) and b["input_ids"].dtype == torch.long for b in blocks)
    assert torch.cat([b["input_ids"] for b in blocks]).tolist() == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 15, 16]
    assert torch.cat([b["loss_mask"] for b in blocks]).tolist() == [0, 0, 1, 1, 1] + [1] * 7
    assert pack_sequences([([1, 2], [1, 1])], seq_len=4) == []
    with pytest.raises(ValueError):
        pack_sequences([([1, 2], [1])], seq_len=1)


def test_collate_pads_right():
    batch = [{"input_ids": torch.tensor([5, 6, 7]), "loss_mask": torch.tensor([0, 1, 1])},
             {"input_ids": [8], "loss_mask": [1]},
             {"input_ids": [9, 9]}]
    out = collate(batch, pad_id=0)
    assert set(out) == {"input_ids", "attention_mask", "loss_mask"}
    assert all(v.shape == (3, 3) and v.dtype == torch.long for v in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0], [9, 9, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 1, 0]]
    assert out["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0], [1, 1, 0]]


def test_collate_of_packed_blocks():
    blocks = pack_sequences([(list(range(12)), [1] * 12)], seq_len=6)
    out = collate(blocks, pad_id=-1)
    assert out["input_ids"].shape == (2, 6) and out["attention_mask"].all() and out["loss_mask"].all()


# -----------------------------------------------------------------------------
# splits and prompt sampling

def _docs(n, length=10):
    """n documents of `length` tokens; document d's tokens are all d, and only odd documents have targets."""
    return [(d, [d] * length, [d % 2] * length) for d in range(n)]


def _make(docs):
    return pack_sequences([(ids, mask) for _, ids, mask in docs], 5)


def test_blocks_from_prefix_tokenises_only_a_prefix():
    docs, seen = _docs(400), []
    make = lambda items: (seen.append(len(items)), _make(items))[1]
    blocks = blocks_from_prefix(docs, make, 30)
    assert len(blocks) >= 30 and max(seen) < len(docs)
    assert [b["input_ids"].tolist() for b in blocks[:30]] == [b["input_ids"].tolist() for b in _make(docs)[:30]]
    assert len(blocks_from_prefix(docs[:5], _make, 1000)) == 10  # not enough: everything there is


def test_sample_blocks_spans_the_split_and_keeps_only_blocks_with_targets():
    docs = _docs(400)
    blocks = sample_blocks(docs, _make, 20)
    assert len(blocks) == 20
    assert all(b["loss_mask"][1:].any() for b in blocks)
    first = {int(b["input_ids"][0]) for b in _make(docs)[:20]}
    drawn = {int(b["input_ids"][0]) for b in blocks}
    assert len(drawn) > 10 and max(drawn) > 100 and max(first) < 10  # many documents from all over, not the first few
    again = sample_blocks(list(docs), _make, 20)
    assert [b["input_ids"].tolist() for b in again] == [b["input_ids"].tolist() for b in blocks]  # deterministic
    other = sample_blocks(docs, _make, 20, seed=1)
    assert [b["input_ids"].tolist() for b in other] != [b["input_ids"].tolist() for b in blocks]
    assert len(sample_blocks(docs[:3], _make, 20)) == 2  # only document 1 has targets: all its 2 blocks


def test_split_by_id_is_deterministic_and_respects_fractions():
    items = [{"id": f"conv-{i}", "n": i} for i in range(1000)]
    splits = split_by_id(items, "id", fractions=(0.8, 0.1, 0.1))
    assert set(splits) == {"train", "validation", "test"}
    sizes = {k: len(v) for k, v in splits.items()}
    assert sum(sizes.values()) == 1000
    assert 740 <= sizes["train"] <= 860 and 60 <= sizes["validation"] <= 140 and 60 <= sizes["test"] <= 140
    ids = {k: {it["id"] for it in v} for k, v in splits.items()}
    assert not (ids["train"] & ids["validation"] or ids["train"] & ids["test"] or ids["validation"] & ids["test"])
    # same assignment in any order, and for an item on its own
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    again = split_by_id(shuffled, lambda it: it["id"], fractions=(0.8, 0.1, 0.1))
    assert {k: {it["id"] for it in v} for k, v in again.items()} == ids
    for name in ("train", "validation", "test"):
        alone = split_by_id([splits[name][0]], "id", fractions=(0.8, 0.1, 0.1))
        assert alone[name] == [splits[name][0]]
    assert [it["n"] for it in splits["test"]] == sorted(it["n"] for it in splits["test"])  # input order kept


def test_split_by_id_rejects_bad_fractions():
    with pytest.raises(ValueError):
        split_by_id([{"id": 1}], "id", fractions=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError):
        split_by_id([{"id": 1}], "id", fractions=(1.1, -0.1))


def test_sample_prompts_is_deterministic():
    items = list(range(50))
    build = lambda x: x if x % 2 else None  # noqa: E731
    a = sample_prompts(items, 5, seed=3, build=build)
    assert a == sample_prompts(items, 5, seed=3, build=build)
    assert len(a) == 5 and all(x % 2 for x in a)
    assert len(sample_prompts(items, 100, seed=3, build=build)) == 25


# -----------------------------------------------------------------------------
# iter_rows (datasets loading) errors

def test_iter_rows_file_errors(tmp_path, hf_offline):
    with pytest.raises(DataError, match=r"^--data_files: .*missing\.jsonl does not exist\.$"):
        list(iter_rows(data_files=str(tmp_path / "missing.jsonl"), cache_dir=hf_offline))
    p = tmp_path / "data.csv"
    p.write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"data\.csv is not a \.json, \.jsonl or \.parquet file"):
        list(iter_rows(data_files=str(p), cache_dir=hf_offline))
    p = tmp_path / "broken.jsonl"
    p.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"^--data_files: line 2 of .*broken\.jsonl is not valid JSON \(Expecting value\); "
                                        r"fix it, or pass --skip_bad_lines to skip such entries\.$"):
        list(iter_rows(data_files=str(p), cache_dir=hf_offline))
    p = tmp_path / "broken.jsonl.gz"  # compressed files go through datasets.load_dataset
    p.write_bytes(gzip.compress(b'{"text": "a"}\n{"text": \n'))
    with pytest.raises(DataError, match=r"^--data_files: could not load .*broken\.jsonl\.gz with datasets\.load_dataset"):
        list(iter_rows(data_files=str(p), cache_dir=hf_offline))


def test_iter_rows_checks_rows_strictly_or_skips_them(tmp_path, hf_offline, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"text": "a"}, {"text": ""}, {"text": "b"}]
    check = lambda row: None if row["text"] else "has an empty 'text'"  # noqa: E731
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"^--data_files: line 2 of .*d\.jsonl has an empty 'text'; fix it"):
        list(iter_rows(data_files=str(p), check=check))
    p.write_text(p.read_text() + "[1]\n")
    bad = data_utils.BadEntries("--data_files", skip=True)
    assert list(iter_rows(data_files=str(p), check=check, bad=bad)) == [rows[0], rows[2]]
    with caplog.at_level(logging.INFO, logger="data_utils"):
        bad.report()  # the file's malformed lines are found as it is read, before the rows are checked
    assert caplog.text.strip().endswith(
        f"skipped 2 bad entries (--skip_bad_lines): line 4 of {p}; line 2 of {p}")
    q = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), q)
    with pytest.raises(DataError, match=r"^--data_files: row 2 of .*d\.parquet has an empty 'text'; fix it"):
        list(iter_rows(data_files=str(q), check=check, cache_dir=hf_offline))


# -----------------------------------------------------------------------------
# strict reading of a user's file (BadEntries)

def test_a_users_file_is_read_strictly_or_its_bad_lines_skipped(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"a": 1}\n{bad json\n[2]\n{"a": 3}\n')
    with pytest.raises(DataError, match=r"^--dataset: line 2 of .*p\.jsonl is not valid JSON \(Expecting property name "
                                        r"enclosed in double quotes\); fix it, or pass --skip_bad_lines to skip such "
                                        r"entries\.$"):
        read_json_records(str(p), flag="--dataset", bad=data_utils.BadEntries("--dataset"))
    bad = data_utils.BadEntries("--dataset", skip=True)
    records, info = read_json_records(str(p), bad=bad)
    assert records == [{"a": 1}, {"a": 3}] and info["lines"] == [1, 4] and info["bad_lines"] == 2
    assert bad.places == [f"line 2 of {p}", f"line 3 of {p}"]
    p.write_text('{"a": 1}\n{"a": 2')  # cut off in the last line
    with pytest.raises(DataError, match=r"line 2 of .*p\.jsonl is not valid JSON \(.*; a cut-off file\?\)"):
        read_json_records(str(p), bad=data_utils.BadEntries())
    write_truncated_array(p, RECORDS, keep=4)
    with pytest.raises(DataError, match=r"line 18 of .*p\.jsonl is where the JSON array breaks off in the middle of a "
                                        r"record \(a cut-off file\?\)"):
        read_json_records(str(p), bad=data_utils.BadEntries())


def test_batch_order_is_a_function_of_the_step():
    order = data_utils.BatchOrder(num_blocks=23, batch_size=2, grad_accum=2, world_size=2, seed=5)
    assert order.steps_per_epoch == 2  # 8 blocks a step; the tail of 7 is skipped
    seen = [i for step in (0, 1) for m in range(2) for r in range(2) for i in order.indices(step, m, r)]
    assert len(set(seen)) == 16  # one epoch never repeats a block
    again = data_utils.BatchOrder(23, 2, 2, 2, 5)
    assert again.indices(3, 1, 1) == order.indices(3, 1, 1)
    assert order.indices(2, 0, 0) != order.indices(0, 0, 0) or order.indices(2, 0, 1) != order.indices(0, 0, 1)


def test_sticky_batch_order_keeps_each_ranks_blocks():
    order = data_utils.BatchOrder(num_blocks=23, batch_size=2, grad_accum=2, world_size=2, seed=5, sticky=True)
    blocks = lambda epoch, r: [i for s in range(2) for m in range(2) for i in order.indices(2 * epoch + s, m, r)]
    for r in range(2):
        assert sorted(blocks(1, r)) == sorted(blocks(0, r)) == sorted(blocks(2, r))  # the same blocks every epoch
        assert blocks(1, r) != blocks(0, r)  # in a new order
    assert not set(blocks(0, 0)) & set(blocks(0, 1))
    # epoch 0 is the plain order
    plain = data_utils.BatchOrder(23, 2, 2, 2, 5)
    assert all(plain.indices(s, m, r) == order.indices(s, m, r) for s in range(2) for m in range(2) for r in range(2))


# -----------------------------------------------------------------------------
# Spec-Bench's question.jsonl: one prompt set per task

QUESTION_CATEGORIES = ("writing", "coding", "stem", "translation", "summarization", "qa", "math_reasoning", "rag")


def write_questions(path, extra=()):
    """Two questions of each of QUESTION_CATEGORIES (the MT-bench ones with a second turn and a reference), in the
    real schema, then `extra` records; returns the records."""
    records = []
    for i, c in enumerate(QUESTION_CATEGORIES * 2):
        r = {"question_id": 81 + i, "category": c, "turns": [f"first {c} {i}"]}
        if c in data_utils.MT_BENCH:
            r["turns"].append(f"second {c} {i}")
            r["reference"] = [f"answer {i}"]
        records.append(r)
    records += list(extra)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def question_args(**kw):
    from types import SimpleNamespace
    return SimpleNamespace(**{"num_prompts": 2, "max_prompt_tokens": 100, "seed": 0, "tf_seq_len": 8,
                              "skip_bad_lines": False, **kw})


def test_a_question_file_is_spelled_out_as_its_task_sets(tmp_path):
    p = tmp_path / "question.jsonl"
    write_questions(p)
    sets = ["conversation", "translation", "summarization", "qa", "math_reasoning", "rag"]
    assert data_utils.dataset_names([str(p)]) == [f"{p}:{s}" for s in sets]
    assert data_utils.dataset_names(["sharegpt:tasks", str(p), f"{p}:qa", "xsum"]) == (
        ["sharegpt:code", "sharegpt:given_text", "sharegpt:open"] + [f"{p}:{s}" for s in sets] + ["xsum"])
    # only the sets with records present, still in the fixed order
    p.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": ["t"]}) + "\n"
                         for i, c in enumerate(["rag", "humanities", "translation"])))
    assert data_utils.dataset_names([str(p)]) == [f"{p}:conversation", f"{p}:translation", f"{p}:rag"]
    # a prompts.jsonl file stays one set
    q = tmp_path / "prompts.jsonl"
    q.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert data_utils.dataset_names([str(q)]) == [str(q)]
    p.write_text('{"question_id": 1, "category": "poetry", "turns": ["t"]}\n')
    with pytest.raises(DataError, match=r"^--dataset: .*question\.jsonl has no question of a known category "
                                        r"\(writing, .*, rag\)\.$"):
        data_utils.dataset_names([str(p)])


def test_each_task_set_loads_the_first_turns_of_its_own_questions(tmp_path, tiny_tokenizer):
    p = tmp_path / "question.jsonl"
    records = write_questions(p)
    render = lambda text: tiny_tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                             add_generation_prompt=True)
    args = question_args(num_prompts=6)
    prompts, blocks = data_utils.load_eval_data(args, tiny_tokenizer, f"{p}:conversation", 0)
    mt = [r for r in records if r["category"] in ("writing", "coding", "stem")]
    assert [p_["id"] for p_ in prompts] == [str(r["question_id"]) for r in mt]  # three categories merged, file order
    assert [p_["text"] for p_ in prompts] == [render(r["turns"][0]) for r in mt] and blocks == []
    assert not any("second" in p_["text"] or "answer" in p_["text"] for p_ in prompts)  # first turn only
    args = question_args()
    for task in ("translation", "summarization", "qa", "math_reasoning", "rag"):
        prompts, _ = data_utils.load_eval_data(args, tiny_tokenizer, f"{p}:{task}", 0)
        mine = [r for r in records if r["category"] == task]
        assert [p_["text"] for p_ in prompts] == [render(r["turns"][0]) for r in mine]
        assert prompts[0]["input_ids"].tolist() == [tiny_tokenizer(render(mine[0]["turns"][0]),
                                                                    add_special_tokens=False)["input_ids"]]
    # held-out blocks: all of them (more asked for than there are) are the qa questions' first turns, packed
    _, blocks = data_utils.load_eval_data(question_args(tf_seq_len=4), tiny_tokenizer, f"{p}:qa", 100)
    a, b = [tiny_tokenizer.apply_chat_template([{"role": "user", "content": r["turns"][0]}], return_dict=False)
            for r in records if r["category"] == "qa"]
    packed = torch.cat([b_["input_ids"] for b_ in blocks]).tolist()
    assert len(packed) == (len(a) + len(b)) // 4 * 4 and packed in ((a + b)[:len(packed)], (b + a)[:len(packed)])
    assert all(b_["loss_mask"].all() for b_ in blocks)


def test_a_task_set_with_too_few_questions_or_a_bad_record_is_an_error(tmp_path, tiny_tokenizer, caplog):
    p = tmp_path / "question.jsonl"
    write_questions(p)
    with pytest.raises(DataError, match=r"^--num_prompts 3: the rag questions of .*question\.jsonl has only 2 prompts "
                                        r"of at most 100 tokens \(--max_prompt_tokens\)"):
        data_utils.load_eval_data(question_args(num_prompts=3), tiny_tokenizer, f"{p}:rag", 0)
    with pytest.raises(DataError, match=r"^--num_prompts 2: the qa questions .* has only 0 prompts of at most 5 "):
        data_utils.load_eval_data(question_args(max_prompt_tokens=5), tiny_tokenizer, f"{p}:qa", 0)
    with pytest.raises(DataError, match=r"^--dataset: 'chat' is not a task set of .*question\.jsonl; the sets are "
                                        r"conversation, translation, summarization, qa, math_reasoning, rag\.$"):
        data_utils.load_eval_data(question_args(), tiny_tokenizer, f"{p}:chat", 0)
    write_questions(p, extra=[{"question_id": 99, "category": "poetry", "turns": ["first poem"]}])
    with pytest.raises(DataError, match=r"^--dataset: line 17 of .*question\.jsonl has category 'poetry', which is "
                                        r"none of writing, roleplay, .*, rag; fix it, or pass --skip_bad_lines"):
        data_utils.load_eval_data(question_args(), tiny_tokenizer, f"{p}:qa", 0)
    for bad in ({"turns": "first x"}, {"turns": []}, {"turns": [3]}, {"turns": [""]}, {}):
        write_questions(p, extra=[{"question_id": 99, "category": "qa", **bad}])
        with pytest.raises(DataError, match=r'^--dataset: line 17 of .*question\.jsonl has no "turns": a list of '
                                            r"strings, the first not empty; fix it"):
            data_utils.load_eval_data(question_args(), tiny_tokenizer, f"{p}:translation", 0)
    write_questions(p, extra=[{"question_id": 99, "category": "qa", "turns": [3]},
                              {"question_id": 100, "category": "qa", "turns": ["third qa"]}])
    with caplog.at_level(logging.INFO, logger="data_utils"):
        prompts, _ = data_utils.load_eval_data(question_args(num_prompts=3, skip_bad_lines=True), tiny_tokenizer,
                                               f"{p}:qa", 0)
    assert [p_["id"] for p_ in prompts] == ["86", "94", "100"]
    assert f"skipped 1 bad entry (--skip_bad_lines): line 17 of {p}" in caplog.text


def test_a_colon_splits_off_a_task_only_after_an_existing_file(tmp_path):
    p = tmp_path / "question.jsonl"
    write_questions(p)
    assert data_utils.question_set(f"{p}:rag") == (str(p), "rag")
    assert data_utils.question_set(f"{p}:x:rag") is None  # the part before the last ':' is not a file
    assert data_utils.question_set("sharegpt:code") is None and data_utils.question_set(str(p)) is None
