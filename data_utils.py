"""
Shared plumbing for the dataset modules (ShareGPT, SlimPajama, XSum) and the scripts' command lines:

- DataError: the one exception for bad data input (the CLIs print it and exit 2)
- UsageError, Parser, int_at_least, positive: bad flag values as one sentence and exit status 2 (train.py, evaluate.py)
- read_json_records: JSON array / JSONL reader that survives a file cut off mid-record
- chat_tokens_with_mask: chat template + a mask over the assistant's tokens
- pack_sequences / blocks_from_prefix / collate: fixed-length training blocks (from as few items as needed), batches
- split_by_id: deterministic train/validation/test split by a stable hash of an id
- sample_prompts: deterministic pick of evaluation prompts
- iter_rows: rows of a `datasets` dataset (local JSON/Parquet files or a hub id), errors as DataError
"""
import argparse
import glob
import hashlib
import itertools
import json
import logging
import os
import random
import re
import sys

import torch

logger = logging.getLogger(__name__)
SPLIT_NAMES = ("train", "validation", "test")
_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace


class DataError(ValueError):
    """Bad data input. The message is one plain sentence naming what was wrong (and which flag, if any)."""


class UsageError(ValueError):
    """A bad command-line value; the message is one sentence that names the flag."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """One sentence and exit status 2, without the usage block."""
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_at_least(lowest):
    """An argparse type: an integer >= lowest."""
    def conv(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be >= {lowest}, got {text}")
        return value
    return conv


def positive(kind):
    """An argparse type: a number of `kind` (int or float) > 0."""
    def conv(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    conv.__name__ = kind.__name__
    return conv


def where(path, flag=None):
    """'--flag: path' when a flag is known, else just the path; the subject of a DataError sentence."""
    return f"{flag}: {path}" if flag else str(path)


def report(msg):
    """Log `msg`; also print it to stderr when the program hasn't configured logging (so it is never lost)."""
    logger.info(msg)
    if not logging.getLogger().hasHandlers():
        print(msg, file=sys.stderr)


# -----------------------------------------------------------------------------
# reading JSON / JSONL

def _read_text(path, flag):
    """The file as str. A multi-byte character cut off by truncation at the very end is dropped."""
    if not os.path.exists(path):
        raise DataError(f"{where(path, flag)} does not exist.")
    if os.path.isdir(path):
        raise DataError(f"{where(path, flag)} is a directory, not a .json or .jsonl file.")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{where(path, flag)} could not be read ({e.strerror}).") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(data) - 4:  # not just a character split by truncation at the end
            raise DataError(f"{where(path, flag)} is not UTF-8 text (bad byte at offset {e.start}).") from e
        return data[:e.start].decode("utf-8")


def read_json_records(path, *, flag=None):
    """
    Read the objects of a JSON array file, or of a JSONL file (also when it is named .json).
    Returns (records, info) with info = {"kept": n, "truncated": bool, "bad_lines": k}.

    A JSON array that stops early (a download cut off mid-record) keeps every complete top-level
    record before the break and sets truncated=True. The text is decoded in one streaming pass with
    JSONDecoder.raw_decode, so a 125 MB file takes about a second. Entries that are not JSON objects,
    and JSONL lines that don't parse, are skipped and counted in bad_lines.
    Raises DataError for a missing/unreadable file or one without a single complete record.
    """
    text = _read_text(path, flag)
    decoder = json.JSONDecoder()
    records, truncated, bad = [], False, 0
    i = _WS.match(text, 0).end()
    if text.startswith("[", i):  # a JSON array: walk its elements one by one
        i += 1
        while True:
            i = _WS.match(text, i).end()
            if text.startswith("]", i):
                break  # empty array (or a lenient trailing comma)
            try:
                obj, i = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                truncated = True  # cut off (or corrupt) here; everything before is kept
                break
            if isinstance(obj, dict):
                records.append(obj)
            else:
                bad += 1
            i = _WS.match(text, i).end()
            if text.startswith(",", i):
                i += 1
            elif text.startswith("]", i):
                break
            else:
                truncated = True  # missing ',' or ']': the array does not go on properly
                break
        if truncated:
            logger.info("%s: JSON array stops early at character %d of %d", path, i, len(text))
    else:  # JSONL (or a single object): one value after another, resyncing at the next line on errors
        while i < len(text):
            try:
                obj, i = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                nl = text.find("\n", i)
                if nl < 0:  # the last line is incomplete
                    truncated = True
                    break
                bad, i = bad + 1, nl + 1
            else:
                if isinstance(obj, dict):
                    records.append(obj)
                else:
                    bad += 1
            i = _WS.match(text, i).end()
    if not records:
        raise DataError(f"{where(path, flag)} contains no complete JSON record.")
    return records, {"kept": len(records), "truncated": truncated, "bad_lines": bad}


# -----------------------------------------------------------------------------
# chat templates and the assistant mask

def render_chat(tokenizer, messages, add_generation_prompt=False):
    """The chat template applied to `messages`, as a string."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode(tokenizer, texts, add_special_tokens=False):
    """Token ids of a str (-> list[int]) or of a list of str (-> list[list[int]], tokenized as one batch)."""
    return tokenizer(texts, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]


def _common_prefix_len(a, b):
    """Length of the longest common prefix of two lists."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    return next(i for i in range(n) if a[i] != b[i])


def chat_tokens_with_mask(tokenizer, messages, max_len=None):
    """
    Token ids of the whole conversation under the tokenizer's chat template, and a 0/1 mask that is 1
    on the assistant's tokens. Both lists are cut to `max_len` if given.

    The mask is found without knowing the template, from template prefixes: for each assistant turn i,
    render messages[:i] with the generation prompt (the text up to where the reply starts) and
    messages[:i+1] (up to where the next turn starts); the tokens in between are the reply. So the
    mask covers the assistant's content plus the template's end-of-turn tokens (ChatML: "<|im_end|>\\n",
    Llama 3: "<|eot_id|>"), which the model must learn to emit in order to stop.
    The template text is tokenized with add_special_tokens=False (templates write their own BOS).

    Fast path (linear time): cut the full text at the prefix boundaries, tokenize the pieces, and use
    their token counts, provided the pieces' tokens concatenate to exactly the full text's tokens
    (true when turns meet at special tokens or newlines, as in ChatML and Llama 3). Otherwise each
    prefix is tokenized in full and a span ends where its tokens stop matching the full token list,
    so a token that merges across a turn boundary can never shift the mask.
    """
    full = render_chat(tokenizer, messages)
    prefixes = []  # (text before the reply, text through the reply) per assistant turn
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and i > 0:
            prefixes.append((render_chat(tokenizer, messages[:i], add_generation_prompt=True),
                             render_chat(tokenizer, messages[:i + 1])))
    ids = encode(tokenizer, full)
    spans = _spans_from_pieces(tokenizer, full, ids, prefixes)
    if spans is None:  # slow path: tokenize every prefix
        prefix_ids = encode(tokenizer, [t for pair in prefixes for t in pair]) if prefixes else []
        spans = [(_common_prefix_len(prefix_ids[2 * k], ids), _common_prefix_len(prefix_ids[2 * k + 1], ids))
                 for k in range(len(prefixes))]
    mask = [0] * len(ids)
    for start, end in spans:
        mask[start:end] = [1] * (end - start)
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


def _spans_from_pieces(tokenizer, full, ids, prefixes):
    """Token spans of the replies from tokenizing the full text cut at the prefix boundaries, or None if unsafe."""
    cuts = [0]
    for before, through in prefixes:
        for text in (before, through):
            if not full.startswith(text) or len(text) < cuts[-1]:
                return None
            cuts.append(len(text))
    cuts.append(len(full))
    piece_ids = encode(tokenizer, [full[a:b] for a, b in zip(cuts[:-1], cuts[1:])])
    if [t for p in piece_ids for t in p] != ids:
        return None
    offsets = [0]
    for p in piece_ids:
        offsets.append(offsets[-1] + len(p))
    return [(offsets[2 * k + 1], offsets[2 * k + 2]) for k in range(len(prefixes))]


# -----------------------------------------------------------------------------
# packing and batching

def pack_sequences(seqs, seq_len):
    """
    Concatenate (input_ids, mask) pairs end to end and cut the stream into blocks of exactly seq_len
    tokens: no padding, the incomplete tail is dropped. Returns a list of
    {"input_ids": LongTensor[seq_len], "loss_mask": LongTensor[seq_len]}; loss_mask[t] = 1 means
    token t is a training target.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    ids, mask = [], []
    for s_ids, s_mask in seqs:
        if len(s_ids) != len(s_mask):
            raise ValueError(f"ids and mask lengths differ ({len(s_ids)} vs {len(s_mask)})")
        ids.extend(s_ids)
        mask.extend(s_mask)
    n = len(ids) // seq_len
    ids = torch.tensor(ids[:n * seq_len], dtype=torch.long).view(n, seq_len)
    mask = torch.tensor(mask[:n * seq_len], dtype=torch.long).view(n, seq_len)
    return [{"input_ids": ids[b], "loss_mask": mask[b]} for b in range(n)]


def blocks_from_prefix(items, make_blocks, needed):
    """make_blocks(items[:k]) for the smallest k tried that gives `needed` blocks (all items when needed is None, or
    when they are not enough): only a prefix of the items is tokenised.

    Deterministic: k depends only on the items and `needed`, so a resumed run sees the same data. Packed blocks are
    prefix-stable (blocks[:n] is the same for every k that gives n blocks), so callers may cut the result to `needed`.
    """
    if needed is None or not items:
        return make_blocks(items)
    k = min(len(items), 64)
    while True:
        blocks = make_blocks(items[:k])
        if len(blocks) >= needed or k >= len(items):
            return blocks
        k = min(len(items), max(2 * k, int(1.25 * k * needed / max(len(blocks), 1)) + 1))


def has_targets(block):
    """Whether a packed block has at least one target token (a position t >= 1 with loss_mask 1)."""
    return bool(torch.as_tensor(block["loss_mask"])[1:].any())


def sample_blocks(items, make_blocks, needed, *, seed=0, pool=8):
    """`needed` blocks with targets, drawn at random (with `seed`) from across a held-out split.

    Taking the first blocks of a split in file order measures a handful of documents (ShareGPT: 24 blocks are about
    four conversations; a trained L15 exit scored 0.41 top-1 there and 0.45 on 160 blocks drawn from the whole
    split). So the items are shuffled, blocks are made from a prefix of them big enough for `pool` x `needed` blocks,
    and `needed` of those are drawn.
    Deterministic in (items, needed, seed); the blocks come back in the order they were packed.
    """
    items = list(items)
    random.Random(seed).shuffle(items)
    blocks = [b for b in blocks_from_prefix(items, make_blocks, pool * needed) if has_targets(b)]
    if len(blocks) <= needed:
        return blocks
    return [blocks[i] for i in sorted(random.Random(seed).sample(range(len(blocks)), needed))]


def collate(batch, pad_id):
    """
    Stack a list of {"input_ids", optional "loss_mask"} items (tensors or lists) into (B, T) LongTensors
    input_ids, attention_mask, loss_mask, right-padding with pad_id to the longest item. Padding has
    attention_mask = loss_mask = 0; a missing loss_mask means every real token is a target.
    """
    T = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), T), dtype=torch.long)
    loss_mask = torch.zeros((len(batch), T), dtype=torch.long)
    for b, item in enumerate(batch):
        ids = torch.as_tensor(item["input_ids"], dtype=torch.long)
        n = len(ids)
        input_ids[b, :n] = ids
        attention_mask[b, :n] = 1
        loss_mask[b, :n] = torch.as_tensor(item["loss_mask"], dtype=torch.long) if "loss_mask" in item else 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


# -----------------------------------------------------------------------------
# splits and prompt sampling

def stable_fraction(value):
    """A number in [0, 1) from a sha256 of str(value): the same on every machine and Python run."""
    digest = hashlib.sha256(str(value).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_id(items, key, fractions=(0.98, 0.01, 0.01)):
    """
    Split items into {"train", "validation", "test"} by a stable hash of each item's id, where `key` is a
    dict key or a function item -> id. An id's split depends only on the id and the fractions, never on
    the order or on the other items. Items keep their input order within a split.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    get_id = key if callable(key) else (lambda item: item[key])
    cut_train, cut_val = fractions[0], fractions[0] + fractions[1]
    splits = {name: [] for name in SPLIT_NAMES}
    for item in items:
        u = stable_fraction(get_id(item))
        name = "train" if u < cut_train else "validation" if u < cut_val else "test"
        splits[name].append(item)
    return splits


def sample_prompts(items, num_prompts, seed, build):
    """
    Visit items in an order shuffled by `seed` and keep the first num_prompts non-None build(item)
    results (build returns a prompt dict, or None to skip the item). Logs when too few qualify.
    """
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    prompts = []
    for i in order:
        if len(prompts) >= num_prompts:
            break
        p = build(items[i])
        if p is not None:
            prompts.append(p)
    if len(prompts) < num_prompts:
        report(f"only {len(prompts)} of the {num_prompts} requested prompts fit the limits ({len(items)} candidates)")
    return prompts


def prompt_dict(id, ids, text):
    """The evaluation prompt record shared by all datasets: {"id", "input_ids": LongTensor (1, T), "text"}."""
    return {"id": str(id), "input_ids": torch.tensor([ids], dtype=torch.long), "text": text}


# -----------------------------------------------------------------------------
# Hugging Face `datasets` loading (local files or hub ids)

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")


def builder_for(files, flag="--data_files"):
    """The `datasets` builder ("json" or "parquet") for a list of local files, from their extensions."""
    kinds = set()
    for f in files:
        name = f[:-len(next(c for c in _COMPRESSION if f.endswith(c)))] if f.endswith(_COMPRESSION) else f
        ext = os.path.splitext(name)[1].lower()
        if ext not in _BUILDERS:
            raise DataError(f"{flag}: {f} is not a .json, .jsonl or .parquet file.")
        kinds.add(_BUILDERS[ext])
    if len(kinds) != 1:
        raise DataError(f"{flag}: mixes JSON and Parquet files; pass files of one kind.")
    return kinds.pop()


def _first_line(e):
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def iter_rows(dataset_id=None, data_files=None, *, split="train", streaming=False, columns=(), cache_dir=None,
              max_rows=None, id_flag="--dataset_id", files_flag="--data_files"):
    """
    Yield the rows (dicts) of a dataset loaded with datasets.load_dataset: from local JSON/JSONL/Parquet
    `data_files` (a path, glob or list; together they form one split, so `split` is not used), or else
    from the hub `dataset_id`'s `split`. Stops after max_rows rows. Raises DataError, naming the flag,
    when loading or reading fails or a required column in `columns` is missing.
    """
    import datasets  # imported here: slow, and only needed by these loaders
    if data_files:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        for f in files:
            if not (glob.glob(f) if glob.has_magic(f) else os.path.isfile(f)):
                raise DataError(f"{files_flag}: {f} does not exist.")
        flag, what = files_flag, ", ".join(files)
        args = dict(path=builder_for(files, files_flag), data_files=files, split="train")
    else:
        flag, what = id_flag, repr(dataset_id)
        args = dict(path=dataset_id, split=split)
    try:
        ds = datasets.load_dataset(**args, streaming=streaming, cache_dir=cache_dir)
        rows = iter(ds)
        for n in itertools.count():
            if max_rows is not None and n >= max_rows:
                return
            try:
                row = next(rows)
            except StopIteration:
                return
            if n == 0:
                missing = [c for c in columns if c not in row]
                if missing:
                    raise DataError(f"{flag}: {what} has no {', '.join(map(repr, missing))} column "
                                    f"(it has {', '.join(map(repr, row))}).")
            yield row
    except DataError:
        raise
    except Exception as e:  # load_dataset raises many kinds (hub, network, builder, parsing)
        raise DataError(f"{flag}: could not load {what} with datasets.load_dataset ({_first_line(e)}).") from e
