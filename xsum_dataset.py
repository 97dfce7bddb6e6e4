"""
XSum one-sentence news summarisation ({"document", "summary", "id"} records) as a chat task: the user
asks for a one-sentence summary of the article, the assistant answers with the reference summary.
"""
from data_utils import (SPLIT_NAMES, BadEntries, chat_tokens_with_mask, encode, iter_rows, loaded, pack_sequences,
                        prompt_dict, render_chat, sample_prompts, split_by_id)

DEFAULT_ID = "EdinburghNLP/xsum"
INSTRUCTION = "Summarize the following article in one sentence.\n\n"
COLUMNS = ("document", "summary", "id")


def load_records(dataset_id="EdinburghNLP/xsum", data_files=None, *, split="validation", cache_dir=None,
                 skip_bad_lines=False):
    """
    XSum records [{"id", "document", "summary"}] (all str) from local JSON/JSONL/Parquet `data_files`
    (which form one split; `split` is then unused) or from the hub `dataset_id`'s `split`.
    A record with an empty document or summary is skipped in hub data; in a local file it is an error naming the
    line (data_utils.BadEntries), unless skip_bad_lines.
    """
    bad = BadEntries("--data_files", skip=skip_bad_lines or not data_files)
    rows = iter_rows(dataset_id, data_files, split=split, columns=COLUMNS, cache_dir=cache_dir, check=_problem, bad=bad)
    records = [{"id": str(row["id"]), "document": row["document"].strip(), "summary": row["summary"].strip()}
               for row in rows]
    return loaded("XSum: {n} records", records, data_files or dataset_id, bad, local=bool(data_files),
                  nothing="has no record with a non-empty document and summary")


def load_splits(data_files=None, dataset_id=None, *, fractions=(0.98, 0.01, 0.01), skip_bad_lines=False,
                max_docs=None, splits=SPLIT_NAMES):
    """{split: records}: local `data_files` split by a stable hash of the id (`fractions`), else the hub dataset's own
    `splits` (`max_docs` is unused). The registry's common signature (data_utils.DATASETS)."""
    if data_files:
        return split_by_id(load_records(data_files=data_files, skip_bad_lines=skip_bad_lines), "id", fractions)
    return {s: load_records(dataset_id=dataset_id or DEFAULT_ID, split=s) for s in splits}


def _problem(row):
    """What makes a row unusable, or None."""
    for key in ("document", "summary"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            return f"has an empty or missing '{key}'"
    return None


def to_messages(record):
    """The record as a two-turn chat: the summarisation request and the reference summary."""
    return [{"role": "user", "content": INSTRUCTION + record["document"]},
            {"role": "assistant", "content": record["summary"]}]


def training_sequences(tokenizer, records, seq_len, assistant_only=True):
    """Packed blocks [{"input_ids", "loss_mask"}] of seq_len tokens; assistant_only puts the loss on the summaries."""
    seqs = []
    for record in records:
        ids, mask = chat_tokens_with_mask(tokenizer, to_messages(record))
        seqs.append((ids, mask if assistant_only else [1] * len(ids)))
    return pack_sequences(seqs, seq_len)


def evaluation_prompts(tokenizer, records, num_prompts, max_prompt_tokens=512, seed=0):
    """
    num_prompts prompts [{"id", "input_ids": LongTensor (1, T), "text"}] chosen deterministically by
    `seed`: the user turn only, under the chat template with the generation prompt. Prompts longer
    than max_prompt_tokens are skipped.
    """
    def build(record):
        text = render_chat(tokenizer, to_messages(record)[:1], add_generation_prompt=True)
        ids = encode(tokenizer, text)
        return prompt_dict(record["id"], ids, text) if len(ids) <= max_prompt_tokens else None
    return sample_prompts(records, num_prompts, seed, build)
