"""
SlimPajama plain text: documents {"text": str, "meta": {"redpajama_set_name": ...}} from local
JSON/JSONL/Parquet files or the hub (cerebras/SlimPajama-627B, DKYoon/SlimPajama-6B), turned into
packed training blocks and text-continuation evaluation prompts.
"""
from data_utils import (SPLIT_NAMES, BadEntries, encode, iter_rows, loaded, pack_sequences, prompt_dict, sample_prompts,
                        split_by_id)

FULL_ID = "cerebras/SlimPajama-627B"  # ~900 GB: streamed by default
SMALL_ID = "DKYoon/SlimPajama-6B"


def load_texts(dataset_id=None, data_files=None, *, split="train", streaming=None, max_docs=None, cache_dir=None,
               skip_bad_lines=False):
    """
    The non-empty `text` fields of SlimPajama documents, at most max_docs of them.
    Local `data_files` take precedence; otherwise `dataset_id` (default DKYoon/SlimPajama-6B) is loaded
    from the hub. streaming=None streams cerebras/SlimPajama-627B, and any hub dataset when only max_docs
    documents are wanted, so nothing is downloaded in full by accident.
    A document with an empty text is skipped in hub data; in a local file it is an error naming the line
    (data_utils.BadEntries), unless skip_bad_lines.
    """
    if not data_files:
        dataset_id = dataset_id or SMALL_ID
    if streaming is None:
        streaming = not data_files and (dataset_id == FULL_ID or max_docs is not None)
    bad = BadEntries("--data_files", skip=skip_bad_lines or not data_files)
    rows = iter_rows(dataset_id, data_files, split=split, streaming=streaming, columns=("text",),
                     cache_dir=cache_dir, max_rows=max_docs, check=_problem, bad=bad)
    return loaded("SlimPajama: {n} documents", [row["text"] for row in rows], data_files or dataset_id, bad,
                  local=bool(data_files), nothing="has no non-empty 'text' documents")


def load_splits(data_files=None, dataset_id=None, *, fractions=(0.98, 0.01, 0.01), skip_bad_lines=False,
                max_docs=None, splits=SPLIT_NAMES):
    """{split: texts}: local `data_files` split by a stable hash of the text (`fractions`), else the hub dataset's own
    `splits`, at most `max_docs` documents each. The registry's common signature (data_utils.DATASETS)."""
    if data_files:
        return split_by_id(load_texts(data_files=data_files, skip_bad_lines=skip_bad_lines), lambda text: text,
                           fractions)
    return {s: load_texts(dataset_id=dataset_id, split=s, max_docs=max_docs) for s in splits}


def _problem(row):
    """What makes a row unusable, or None."""
    return None if isinstance(row.get("text"), str) and row["text"].strip() else "has an empty or missing 'text'"


def encode_documents(tokenizer, texts):
    """
    Token ids per document, tokenized as one batch with the tokenizer's own special tokens (so Llama
    tokenizers prepend their BOS, as in pretraining; ChatML tokenizers like SmolLM2's add nothing).
    """
    return encode(tokenizer, list(texts), add_special_tokens=True)


def training_sequences(tokenizer, texts, seq_len, assistant_only=True):
    """Packed blocks [{"input_ids", "loss_mask"}] of seq_len tokens: documents joined by EOS, loss on every token
    (plain text has no assistant turns: `assistant_only` is unused)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id to separate documents")
    seqs = [(ids + [eos], [1] * (len(ids) + 1)) for ids in encode_documents(tokenizer, texts)]
    return pack_sequences(seqs, seq_len)


def evaluation_prompts(tokenizer, texts, num_prompts, max_prompt_tokens=256, seed=0):
    """
    num_prompts plain-text continuation prompts [{"id", "input_ids": LongTensor (1, T), "text"}], chosen
    deterministically by `seed`: a document's first max_prompt_tokens tokens. Documents with no more
    than max_prompt_tokens tokens are skipped, so every prompt stops mid-document. The id is the
    document's index in `texts`; text is the decoded prompt.
    """
    def build(i):
        ids = encode_documents(tokenizer, [texts[i]])[0]
        if len(ids) <= max_prompt_tokens:
            return None
        ids = ids[:max_prompt_tokens]
        return prompt_dict(i, ids, tokenizer.decode(ids, skip_special_tokens=False))
    return sample_prompts(list(range(len(texts))), num_prompts, seed, build)
