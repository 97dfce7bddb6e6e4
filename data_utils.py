"""
Shared plumbing for the dataset modules (ShareGPT, SlimPajama, XSum); errors are cli.DataError (one sentence):

- DATASETS, dataset_module: the one registry of datasets; each module has load_splits, training_sequences and
  evaluation_prompts
- read_json_records: JSON array / JSONL reader that survives a file cut off mid-record, or (BadEntries) reads a
  user's file strictly, naming the line of the first bad entry
- chat_tokens_with_mask: chat template + a mask over the assistant's tokens
- pack_sequences / blocks_from_prefix / collate: fixed-length training blocks (from as few items as needed), batches
- split_by_id: deterministic train/validation/test split by a stable hash of an id
- sample_prompts: deterministic pick of evaluation prompts
- iter_rows: rows of a `datasets` dataset (local JSON/Parquet files or a hub id), errors as DataError
"""
import glob
import hashlib
import importlib
import json
import logging
import os
import random
import re
import sys

import torch

from cli import DataError

logger = logging.getLogger(__name__)
SPLIT_NAMES = ("train", "validation", "test")
_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace


# The datasets, by --dataset name: each module has load_splits(data_files, dataset_id, *, fractions, skip_bad_lines,
# max_docs), training_sequences(tokenizer, items, seq_len, assistant_only) and evaluation_prompts(tokenizer, items,
# num_prompts, max_prompt_tokens=, seed=). Imported when asked for: they import this module.
DATASETS = {"sharegpt": "share_gpt_dataset", "slimpajama": "slim_pj_dataset", "xsum": "xsum_dataset"}


def dataset_module(name):
    """The module of the dataset called `name` in DATASETS."""
    return importlib.import_module(DATASETS[name])


def loaded(kind, items, source, bad, *, local, nothing):
    """The end of a loader: report how many `kind` (e.g. "SlimPajama: 12 documents") came from `source` and how many
    bad entries were skipped; raise DataError("<flag>: <source> <nothing>.") when there are none."""
    skipped = len(bad.places)
    report(f"{kind.format(n=len(items))} from {source}" + (f" ({skipped} skipped)" if skipped else ""))
    if local:
        bad.report()
    if not items:
        raise DataError(f"{'--data_files' if local else '--dataset_id'}: {source} {nothing}.")
    return items


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


class BadEntries:
    """What becomes of a bad entry in a user's data file (a line that is not valid JSON or not an object, a file cut
    off in the middle of a record, a record without what the loader needs): by default a DataError naming the file
    and the line; with skip=True (--skip_bad_lines) it is skipped and counted, and `report` says how many."""

    def __init__(self, flag=None, skip=False):
        self.flag, self.skip, self.places = flag, skip, []

    def found(self, path, place, problem):
        """A bad entry at `place` ("line 3", "row 3") of `path`; `problem` completes the sentence ("is not ...")."""
        if not self.skip:
            raise DataError(f"{self.flag + ': ' if self.flag else ''}{place} of {path} {problem}; fix it, or pass "
                            "--skip_bad_lines to skip such entries.")
        self.places.append(f"{place} of {path}")

    def report(self):
        n = len(self.places)
        if n:
            more = "; ..." if n > 3 else ""
            report(f"skipped {n} bad entr{'y' if n == 1 else 'ies'} (--skip_bad_lines): {'; '.join(self.places[:3])}"
                   f"{more}")


def _line_counter(text):
    """line_at(i): the line number (from 1) of character offset i, for offsets that never decrease."""
    pos, line = 0, 1

    def line_at(i):
        nonlocal pos, line
        line += text.count("\n", pos, i)
        pos = i
        return line
    return line_at


def read_json_records(path, *, flag=None, bad=None):
    """
    Read the objects of a JSON array file, or of a JSONL file (also when it is named .json).
    Returns (records, info) with info = {"kept": n, "truncated": bool, "bad_lines": k, "lines": [the line each
    record starts on]}.

    Without `bad` the reader is lenient: a JSON array that stops early (a download cut off mid-record) keeps every
    complete top-level record before the break and sets truncated=True; entries that are not JSON objects, and JSONL
    lines that don't parse, are skipped and counted in bad_lines. With `bad` (a BadEntries: a user's file) each of
    these is passed to it, which raises a DataError naming the line, or skips it under --skip_bad_lines.
    The text is decoded in one streaming pass with JSONDecoder.raw_decode, so a 125 MB file takes about a second.
    Raises DataError for a missing/unreadable file or one without a single complete record.
    """
    text = _read_text(path, flag)
    decoder = json.JSONDecoder()
    line_at = _line_counter(text)
    records, lines, truncated, bad_count = [], [], False, 0

    def skip(i, problem):
        nonlocal bad_count
        bad_count += 1
        if bad is not None:
            bad.found(path, f"line {line_at(i)}", problem)

    def keep(obj, i):
        if isinstance(obj, dict):
            records.append(obj)
            lines.append(line_at(i))
        else:
            skip(i, "is not a JSON object")

    i = _WS.match(text, 0).end()
    if text.startswith("[", i):  # a JSON array: walk its elements one by one
        i += 1
        while True:
            i = _WS.match(text, i).end()
            if text.startswith("]", i):
                break  # empty array (or a lenient trailing comma)
            try:
                obj, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                truncated = True  # cut off (or corrupt) here; everything before is kept
                break
            keep(obj, i)
            i = _WS.match(text, end).end()
            if text.startswith(",", i):
                i += 1
            elif text.startswith("]", i):
                break
            else:
                truncated = True  # missing ',' or ']': the array does not go on properly
                break
        if truncated:
            logger.info("%s: JSON array stops early at character %d of %d", path, i, len(text))
            if bad is not None:
                bad.found(path, f"line {line_at(i)}", "is where the JSON array breaks off in the middle of a record "
                                                      "(a cut-off file?)")
    else:  # JSONL (or a single object): one value after another, resyncing at the next line on errors
        while i < len(text):
            try:
                obj, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as e:
                nl = text.find("\n", i)
                if nl < 0:  # the last line is incomplete
                    truncated = True
                    if bad is not None:
                        bad.found(path, f"line {line_at(i)}", f"is not valid JSON ({e.msg}; a cut-off file?)")
                    break
                skip(i, f"is not valid JSON ({e.msg})")
                end = nl + 1
            else:
                keep(obj, i)
            i = _WS.match(text, end).end()
    if not records:
        raise DataError(f"{where(path, flag)} contains no complete JSON record.")
    return records, {"kept": len(records), "truncated": truncated, "bad_lines": bad_count, "lines": lines}


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
              max_rows=None, id_flag="--dataset_id", files_flag="--data_files", check=None, bad=None):
    """
    Yield the rows (dicts) of a dataset: from local JSON/JSONL/Parquet `data_files` (a path, glob or list; together
    they form one split, so `split` is not used), or else from the hub `dataset_id`'s `split`. Stops after max_rows
    rows. Raises DataError, naming the flag, when loading or reading fails or a required column in `columns` is
    missing from the first row.

    Uncompressed JSON/JSONL files are read with read_json_records, the rest (Parquet, compressed files, hub ids) with
    datasets.load_dataset. `check(row)` says what is wrong with a row ("has an empty 'text'"; None: nothing). Such
    rows, and malformed lines of the JSON files, go to `bad` (a BadEntries; by default each is an error naming the
    file and the line or row).
    """
    flag = files_flag if data_files else id_flag
    bad = bad if bad is not None else BadEntries(flag)
    if data_files:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        for f in files:
            if not (glob.glob(f) if glob.has_magic(f) else os.path.isfile(f)):
                raise DataError(f"{files_flag}: {f} does not exist.")
        what, builder = ", ".join(files), builder_for(files, files_flag)
        if builder == "json" and not any(f.endswith(_COMPRESSION) for f in files):
            rows = _json_file_rows(files, files_flag, bad)
        else:
            rows = _dataset_rows(dict(path=builder, data_files=files, split="train"), what, flag, streaming, cache_dir)
    else:
        what = repr(dataset_id)
        rows = _dataset_rows(dict(path=dataset_id, split=split), what, flag, streaming, cache_dir)
    for n, (path, place, row) in enumerate(rows):
        if max_rows is not None and n >= max_rows:
            return
        missing = [c for c in columns if c not in row] if n == 0 else []
        if missing:
            raise DataError(f"{flag}: {what} has no {', '.join(map(repr, missing))} column "
                            f"(it has {', '.join(map(repr, row))}).")
        problem = check(row) if check is not None else None
        if problem is None:
            yield row
        else:
            bad.found(path, place, problem)


def _json_file_rows(files, flag, bad):
    """(file, "line N", record) for the records of local JSON/JSONL files, read strictly through `bad`."""
    for pattern in files:
        for path in sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]:
            records, info = read_json_records(path, flag=flag, bad=bad)
            for record, line in zip(records, info["lines"]):
                yield path, f"line {line}", record


def _dataset_rows(load_args, what, flag, streaming, cache_dir):
    """(what, "row N", row) for the rows of datasets.load_dataset(**load_args); its errors as DataError."""
    import datasets  # imported here: slow, and only needed by these loaders
    try:
        ds = datasets.load_dataset(**load_args, streaming=streaming, cache_dir=cache_dir)
        for n, row in enumerate(ds):
            yield what, f"row {n + 1}", row
    except Exception as e:  # load_dataset raises many kinds (hub, network, builder, parsing)
        raise DataError(f"{flag}: could not load {what} with datasets.load_dataset ({_first_line(e)}).") from e


def data_hash(blocks):
    """A short hash of the training blocks, stored with the resume state to catch a change of data."""
    h = hashlib.sha256()
    for b in blocks:
        h.update(b["input_ids"].numpy().tobytes())
        h.update(b["loss_mask"].numpy().tobytes())
    return h.hexdigest()[:16]


class BatchOrder:
    """Which training blocks each micro-batch of each step gets: a pure function of the step.

    Epoch e visits the blocks in a permutation drawn from a generator seeded with (seed, e). A step takes
    G = batch_size * grad_accum * world_size blocks; micro-batch k of rank r takes the slice (k * world + r)
    of them. The incomplete tail of an epoch is skipped. So the data position of a run is just its step.

    With `sticky` (for --cache_states), each rank keeps the blocks it got in epoch 0 and later epochs only reorder
    them within the rank, so every rank finds its blocks' cached base states.
    """

    def __init__(self, num_blocks, batch_size, grad_accum, world_size, seed, sticky=False):
        self.n, self.b, self.accum, self.world, self.seed = num_blocks, batch_size, grad_accum, world_size, seed
        self.per_step = batch_size * grad_accum * world_size
        self.steps_per_epoch = num_blocks // self.per_step
        self.sticky = sticky
        self._perm = (None, None)

    def position(self, step):
        """(epoch, step within the epoch) of a step."""
        return divmod(step, self.steps_per_epoch)

    def _permutation(self, epoch):
        if not self.sticky or epoch == 0:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            return torch.randperm(self.n, generator=g)
        perm = self._permutation(0)[:self.steps_per_epoch * self.per_step].clone()
        owner = (torch.arange(len(perm)) % self.per_step) // self.b % self.world  # the rank of each slot
        for r in range(self.world):
            slots = (owner == r).nonzero().squeeze(1)
            g = torch.Generator().manual_seed((self.seed * 100003 + epoch) * 1009 + r)
            perm[slots] = perm[slots][torch.randperm(len(slots), generator=g)]
        return perm

    def indices(self, step, micro, rank):
        epoch, i = self.position(step)
        if self._perm[0] != epoch:
            self._perm = (epoch, self._permutation(epoch))
        start = i * self.per_step + (micro * self.world + rank) * self.b
        return self._perm[1][start:start + self.b].tolist()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation prompts and held-out text (evaluate.py's --dataset): a built-in dataset's test split, a ShareGPT task
# group, a prompts.jsonl file, or a task of a Spec-Bench question.jsonl file


def prompt_messages(record):
    """The chat turns of a prompts.jsonl record, {"prompt": str} or {"messages": [{"role", "content"}, ...]}; None
    when it has no usable prompt (an empty string, turns that are not all {"role": str, "content": str}, ...)."""
    if isinstance(record.get("prompt"), str) and record["prompt"].strip():
        return [{"role": "user", "content": record["prompt"]}]
    messages = record.get("messages")
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    return messages if ok else None


def load_prompt_file(path, tokenizer, num_prompts, max_prompt_tokens, seq_len, skip_bad_lines=False, blocks=0):
    """A prompts.jsonl file: each line {"prompt": str} or {"messages": [{"role", "content"}, ...]}, used in file order.

    The prompt is the line up to its last non-assistant turn, under the chat template with the generation prompt.
    The held-out text for the teacher-forced sweep is `blocks` blocks (none for 0) drawn from the lines in full, as
    for the built-in datasets: loss on the assistant's turns when a line has some, else on every token. Lines longer
    than max_prompt_tokens are skipped as prompts. A malformed line, or one without a usable prompt, is an error
    naming it (skipped and counted with skip_bad_lines); so is a file with fewer than num_prompts prompts."""
    bad = BadEntries("--dataset", skip=skip_bad_lines)
    records, info = read_json_records(path, flag="--dataset", bad=bad)
    chats = []
    for i, (r, line) in enumerate(zip(records, info["lines"])):
        messages = prompt_messages(r)
        if messages is None:
            bad.found(path, f"line {line}", 'has no usable prompt (a non-empty "prompt" string, or "messages": a list '
                                            'of {"role", "content"} strings)')
        else:
            chats.append((r.get("id", i), messages))
    bad.report()
    return chat_prompts(chats, path, tokenizer, num_prompts, max_prompt_tokens, seq_len, blocks)


def chat_prompts(chats, source, tokenizer, num_prompts, max_prompt_tokens, seq_len, blocks):
    """(prompts, held-out blocks) from `chats`, (id, messages) pairs in order, as load_prompt_file describes; fewer
    than num_prompts prompts is an error naming `source`."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    join = lambda turns: "\n\n".join(m["content"] for m in turns)
    prompts, seqs = [], []
    for id, messages in chats:
        asked = messages
        while len(asked) > 1 and asked[-1]["role"] == "assistant":
            asked = asked[:-1]
        text = render_chat(tokenizer, asked, add_generation_prompt=True) if chat else join(asked)
        ids = encode(tokenizer, text)
        if len(prompts) < num_prompts and 0 < len(ids) <= max_prompt_tokens:
            prompts.append(prompt_dict(id, ids, text))
        if not blocks:
            continue
        if chat and any(m["role"] == "assistant" for m in messages):
            seqs.append(chat_tokens_with_mask(tokenizer, messages))
        else:
            full = encode(tokenizer, render_chat(tokenizer, messages) if chat else join(messages))
            seqs.append((full, [1] * len(full)))
    check_prompt_count(prompts, num_prompts, max_prompt_tokens, source)
    return prompts, sample_blocks(seqs, lambda some: pack_sequences(some, seq_len), blocks) if blocks else []


# Spec-Bench's question.jsonl: one {"question_id", "category", "turns": [str, ...]} a line. MT-bench's eight
# categories form one task set, `conversation`; each other category is a set of its own.
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
QUESTION_TASKS = {**{c: "conversation" for c in MT_BENCH},
                  **{c: c for c in ("translation", "summarization", "qa", "math_reasoning", "rag")}}  # category -> set
QUESTION_SETS = tuple(dict.fromkeys(QUESTION_TASKS.values()))  # conversation, translation, ..., rag: their order
QUESTION_KEYS = ("question_id", "category", "turns")


def question_file_sets(path):
    """The task sets (in QUESTION_SETS order) with records in `path` when it is a question.jsonl-format file (its
    first record has QUESTION_KEYS), else None. Read leniently: the loader names the bad lines."""
    if not os.path.isfile(path):
        return None
    try:
        records, _ = read_json_records(path)
    except DataError:
        return None
    if not all(k in records[0] for k in QUESTION_KEYS):
        return None
    present = {QUESTION_TASKS.get(r.get("category")) for r in records}
    sets = [t for t in QUESTION_SETS if t in present]
    if not sets:
        raise DataError(f"--dataset: {path} has no question of a known category ({', '.join(QUESTION_TASKS)}).")
    return sets


def question_set(name):
    """(PATH, TASK) for a --dataset name PATH:TASK (split at the last ':') whose PATH is an existing file, else None."""
    path, colon, task = name.rpartition(":")
    if not colon or path in DATASETS or not os.path.isfile(path):
        return None
    return path, task


def question_problem(record):
    """What is wrong with a question.jsonl record, completing "line 3 of PATH ...", or None."""
    turns = record.get("turns")
    if not (isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns) and turns[0].strip()):
        return 'has no "turns": a list of strings, the first not empty'
    if record.get("category") not in QUESTION_TASKS:
        return f"has category {record.get('category')!r}, which is none of {', '.join(QUESTION_TASKS)}"
    return None


def load_question_set(path, task, tokenizer, num_prompts, max_prompt_tokens, seq_len, skip_bad_lines=False,
                      blocks=0):
    """The questions of one task set (QUESTION_SETS) of a question.jsonl file, each its first turn as a single user
    message, loaded as load_prompt_file loads its lines. Every line of the file is checked: a malformed one, or one
    of an unknown category, is an error naming it (skipped and counted with skip_bad_lines)."""
    if task not in QUESTION_SETS:
        raise DataError(f"--dataset: {task!r} is not a task set of {path}; the sets are {', '.join(QUESTION_SETS)}.")
    bad = BadEntries("--dataset", skip=skip_bad_lines)
    records, info = read_json_records(path, flag="--dataset", bad=bad)
    chats = []
    for i, (r, line) in enumerate(zip(records, info["lines"])):
        problem = question_problem(r)
        if problem:
            bad.found(path, f"line {line}", problem)
        elif QUESTION_TASKS[r["category"]] == task:
            chats.append((r.get("question_id", i), [{"role": "user", "content": r["turns"][0]}]))
    bad.report()
    return chat_prompts(chats, f"the {task} questions of {path}", tokenizer, num_prompts, max_prompt_tokens, seq_len,
                        blocks)


def check_prompt_count(prompts, num_prompts, max_prompt_tokens, source, kind="prompt"):
    """A run uses the number of prompts asked for, or stops here saying why not."""
    if len(prompts) < num_prompts:
        which = f"{kind}{'' if len(prompts) == 1 else 's'} of at most {max_prompt_tokens} tokens"
        if kind == "document":  # SlimPajama: a prompt is the start of a longer document
            which = f"document{'' if len(prompts) == 1 else 's'} longer than {max_prompt_tokens} tokens"
        raise DataError(f"--num_prompts {num_prompts}: {source} has only {len(prompts)} {which} "
                        "(--max_prompt_tokens); ask for fewer prompts or change --max_prompt_tokens.")


TASKS = "sharegpt:tasks"  # --dataset shorthand for the three ShareGPT task groups
TASK_GROUPS = ("code", "given_text", "open")  # those groups (share_gpt_dataset.task_group sorts prompts into them)


def dataset_names(values):
    """--dataset's values with sharegpt:tasks spelled out as its groups (sharegpt:code, ...) and a question.jsonl file
    PATH as its task sets present (PATH:conversation, PATH:translation, ...: QUESTION_SETS), each once."""
    def spelled_out(v):
        if v == TASKS:
            return [f"sharegpt:{g}" for g in TASK_GROUPS]
        sets = None if v in DATASETS else question_file_sets(v)
        return [f"{v}:{t}" for t in sets] if sets else [v]
    return list(dict.fromkeys(n for v in values for n in spelled_out(v)))


def load_eval_data(args, tokenizer, dataset, blocks):
    """(prompts, `blocks` held-out blocks for the teacher-forced sweep) from one --dataset value: the test split of
    ShareGPT, XSum or SlimPajama (the same 98/1/1 split by id as train.py's default), a ShareGPT task group
    (sharegpt:code, sharegpt:given_text, sharegpt:open: share_gpt_dataset.task_group's rule, over the held-out test
    and validation splits, which a task group needs to hold enough prompts), a prompts.jsonl file, or PATH:TASK, the
    questions of one task set of a Spec-Bench question.jsonl file (load_question_set)."""
    n, mpt, seed, seq_len = args.num_prompts, args.max_prompt_tokens, args.seed, args.tf_seq_len
    if question_set(dataset):
        return load_question_set(*question_set(dataset), tokenizer, n, mpt, seq_len, args.skip_bad_lines, blocks)
    if dataset not in DATASETS and not dataset.startswith("sharegpt:"):
        return load_prompt_file(dataset, tokenizer, n, mpt, seq_len, args.skip_bad_lines, blocks)
    name, _, group = dataset.partition(":")
    ds = dataset_module(name)
    splits = ("test", "validation") if group else ("test",)
    loaded = ds.load_splits(args.data_files, args.dataset_id, skip_bad_lines=args.skip_bad_lines, max_docs=2000,
                            splits=splits)
    items = [c for s in splits for c in loaded[s]]
    if group:
        items = ds.in_group(items, group)
    prompts = ds.evaluation_prompts(tokenizer, items, n, max_prompt_tokens=mpt, seed=seed)
    check_prompt_count(prompts, n, mpt, f"the {dataset} {'held-out' if group else 'test'} split",
                       "document" if name == "slimpajama" else "prompt")
    make = lambda items: ds.training_sequences(tokenizer, items, seq_len)
    return prompts, sample_blocks(items, make, blocks) if blocks else []
