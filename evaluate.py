"""The self-speculation sweep: the loop of generate.py over a grid of cells, each against an autoregressive baseline.

A cell is (exit, layer L, gamma, policy, draft stop) on one set of prompts; every cell runs
`speculative_generate` and the baseline runs `autoregressive_generate` on the same prompts, policy and seeds. It
writes to --out_dir (files and tables: results.py; plots: plots.py):

    results.jsonl        one line per cell: the loop's stats over all prompts, tokens/s, speedup, c, predicted speedup,
                         and beside them transformers' generate on the same prompts and policy (the library a user
                         would pick): its tokens/s and our autoregressive loop's, timed in turns (--peer)
    summary.csv/.md      the same as a table
    layer_sweep.jsonl/.csv  teacher-forced metrics of every exit at every layer, from one pass per batch of text
    *.png                the plots, among them where_it_pays.png: the (a, c) map with break-even curves

    python evaluate.py --exit_layers 8 15 22 --exit_ckpt out/exit --gammas 2 4 --temperatures 0 0.7
    torchrun --nproc_per_node 2 evaluate.py ...     # cells split across processes by cost (accelerate launch: GPUs)
    python evaluate.py ... --resume                 # after an interruption: skips every finished cell
    python evaluate.py --best_line OUT_DIR          # the best lossless speedup of a finished sweep (its last line)
"""
import argparse
import hashlib
import itertools
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import MISSING, asdict, dataclass
from dataclasses import fields as dataclass_fields
from datetime import timedelta
from functools import partial
from pathlib import Path

import torch

import decode_engine
from checkpoints import CheckpointError, write_atomically
from cli import (DEVICE_CHOICES, Parser, SignalStop, UsageError, check_context, int_at_least, parse_layers,
                 resolve_device, run_command)
from data_utils import DATASETS, TASK_GROUPS, TASKS, dataset_names, load_eval_data, question_set
from drafts import SOURCES, make_source
from generate import (DRAFTS, Drafting, Policy, autoregressive_generate, check_policy, remember_costs,
                      speculative_generate, step_times)
from losses import exit_metric_sums, summarize_metrics, target_rows
from results import (LAYER_SWEEP, RESULTS, SUMMARY_COLUMNS, SUMMARY_CSV, SUMMARY_MD, append_row, best_line,
                     finished_cells, markdown_table, merge_results, predicted_mixed_speedup, predicted_speedup,
                     predicted_tree_speedup, prompt_sets, read_results, read_rows, repair_tail, results_files,
                     tokens_per_cycle, write_table)
from truncated_llama import DEFAULT_MODEL, DTYPE_CHOICES, ENGINES, ModelLoadError, trees_need_lean

# ----------------------------------------------------------------------------------------------------------------
# Cells


@dataclass(frozen=True)
class Cell:
    exit: str            # "untrained", or the checkpoint directory as given to --exit_ckpt
    exit_layer: int
    gamma: int           # the draft length; with draft_stop, its cap
    temperature: float
    top_p: float
    top_k: int
    draft_stop: float = 0.0  # adaptive draft length: stop when the draft's top probability is below this (0: off)
    tree_width: int = 1      # candidates per expanded node of a draft tree of depth gamma (1: a chain)
    tree_nodes: int = 0      # the tree's node budget (0: tree_width x gamma; always 0 for a chain)
    draft: str = "exit"      # the draft source (drafts.DRAFTS); one without the exit has exit "none", layer 0
    lookup_tokens: int = 0   # exit+lookup: the lookup's proposal length (0: gamma); lookup cells: gamma is it
    ngram: int = 3           # the lookup's longest n-gram
    prompt_set: str = ""     # which --dataset the prompts come from ("" when there is one)

    @property
    def policy(self):
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    @property
    def drafting(self):
        """How the cell drafts, as speculative_generate takes it."""
        return Drafting(self.draft, self.gamma, self.tree_width, self.tree_nodes, self.draft_stop, self.lookup_tokens,
                        self.ngram)


def make_cells(exits, gammas, temperatures, top_ps, top_ks, draft_stops=(0.0,), tree_widths=(1,), tree_nodes=(0,),
               drafts=("exit",), lookup_tokens=(0,), ngram=3, prompt_sets=("",)):
    """Every cell, in a fixed order: exits (as given), then prompt set, draft source, gamma, temperature, top_p,
    top_k, draft_stop, tree width and nodes, lookup length. Greedy ignores top_p and top_k, so greedy cells are kept
    once, with top_p 1.0 and top_k 0; a chain (width 1) has no node budget, and a budget of width x gamma is the
    default one (0). Sources without the exit (lookup, recycle) come once (exit "none", layer 0), with no draft_stop;
    lookup cells have no node budget (a tree of its branches: the width), gamma being the lookup's length; only
    exit+lookup cells have a lookup length of their own."""
    cells = []
    exits = list(exits) + ([("none", 0)] if any(not SOURCES[d].exit for d in drafts) else [])
    for (name, layer), ps, d, g, t, p, k, s, w, m, lt in itertools.product(
            exits, prompt_sets, drafts, gammas, temperatures, top_ps, top_ks, draft_stops, tree_widths, tree_nodes,
            lookup_tokens):
        kind = SOURCES[d]
        if kind.exit == (name == "none"):
            continue
        if not kind.exit:  # no q: no draft_stop
            s = 0.0
        if not kind.nodes:  # lookup's tree: its branches (the width) alone
            m = 0
        if not (kind.exit and kind.lookup):  # a lookup length of its own beside gamma: exit + lookup only
            lt = 0
        m = 0 if w == 1 or m == w * g else m
        lt = 0 if lt == g else lt
        cell = Cell(name, layer, g, float(t), 1.0 if t == 0 else float(p), 0 if t == 0 else k, float(s), w, m, d, lt,
                    ngram if kind.lookup else 3, ps)
        if cell not in cells:
            cells.append(cell)
    return cells


def cell_id(cell, context):
    """A stable id of a cell: a hash of its fields and everything its numbers depend on (model, exit weights, its
    prompts, max_new_tokens, seed, dtype, device). Fields at their defaults (draft_stop 0, tree_width 1, tree_nodes
    0, draft exit, ...) are left out, so cells of sweeps made before they existed keep their ids (and --resume finds
    them)."""
    fields = asdict(cell)
    for f in dataclass_fields(Cell):  # every field with a default (draft_stop 0.0, tree_width 1, ...)
        if f.default is not MISSING and fields[f.name] == f.default:
            del fields[f.name]
    if isinstance(context.get("prompts"), dict):  # {prompt set: hash}: this cell's prompts only
        context = {**context, "prompts": context["prompts"][cell.prompt_set]}
    exit_id = context["exit_ids"].get(cell.exit, "none")
    key = json.dumps({**fields, **context, "exit_id": exit_id}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def prompt_seed(seed, index):
    """The sampling seed of prompt `index`: the same for the speculative and the baseline run of every cell."""
    return int(hashlib.sha256(f"{seed}/{index}".encode()).hexdigest()[:15], 16)


def run_baseline(model, prompts, policy, max_new_tokens, seed, eos, first=0):
    """The autoregressive reference for one policy: every prompt's tokens and the total time (`first`: the index
    of prompts[0] in the sweep's prompts, which picks its sampling seed)."""
    tokens, each = [], []
    for i, p in enumerate(prompts, start=first):
        g = torch.Generator(p["input_ids"].device).manual_seed(prompt_seed(seed, i))
        out, s = autoregressive_generate(model, p["input_ids"], max_new_tokens, eos_token_id=eos, generator=g, **policy)
        tokens.append(out)
        each.append(s["seconds"])
    new, seconds = sum(len(t) for t in tokens), sum(each)
    return {"tokens": tokens, "new_tokens": new, "seconds": seconds, "tokens_per_s": new / seconds if seconds else 0.0,
            "seconds_each": each}


def run_peer(model, prompts, policy, max_new_tokens, seed, eos):
    """Our autoregressive loop beside transformers' `generate` on the same prompts and policy (sampling with the
    same temperature, top-p and top-k, greedy otherwise), prompt by prompt in turns, so that a drift in the machine's
    speed falls on both alike: the tokens/s of each, their ratio and, greedy, how many prompts gave equal tokens."""
    ours = run_baseline(model, prompts[:1], policy, 4, seed, eos)  # warm both up, untimed
    base, sample = model.base, policy["temperature"] > 0
    kw = dict(do_sample=True, temperature=policy["temperature"], top_p=policy["top_p"], top_k=policy["top_k"]) \
        if sample else dict(do_sample=False)
    peer = lambda ids, n: base.generate(ids, max_new_tokens=n, eos_token_id=eos, pad_token_id=eos, **kw)
    peer(prompts[0]["input_ids"], 4)
    tokens, seconds, same = {"ours": 0, "generate": 0}, {"ours": 0.0, "generate": 0.0}, 0
    for i, p in enumerate(prompts):
        ours = run_baseline(model, [p], policy, max_new_tokens, seed, eos, first=i)
        torch.manual_seed(prompt_seed(seed, i))
        t = time.perf_counter()
        out = peer(p["input_ids"], max_new_tokens)[0, p["input_ids"].shape[1]:].cpu()
        if out.device.type == "cuda":
            torch.cuda.synchronize()
        seconds["generate"] += time.perf_counter() - t
        tokens["generate"] += len(out)
        tokens["ours"] += ours["new_tokens"]
        seconds["ours"] += ours["seconds"]
        same += not sample and torch.equal(out, ours["tokens"][0].cpu())
    tps = {k: tokens[k] / seconds[k] if seconds[k] else 0.0 for k in tokens}
    return {"peer_ar_tokens_per_s": tps["ours"], "generate_tokens_per_s": tps["generate"],
            "ar_vs_generate": tps["ours"] / tps["generate"] if tps["generate"] else None,
            "generate_greedy_match": None if sample else f"{same}/{len(prompts)}"}


def first_difference(a, b):
    """The first position where token sequences a and b differ (a length difference counts); None if equal."""
    n = min(len(a), len(b))
    where = (a[:n] != b[:n]).nonzero()
    if len(where):
        return int(where[0])
    return None if len(a) == len(b) else n


def run_cell(model, cell, prompts, max_new_tokens, seed, eos, baseline, times):
    """Speculative decoding of every prompt for one cell; its row of results (stats summed over prompts).
    `baseline` None: the cell times its own baseline, each prompt's autoregressive run just before its speculative
    one (paired, so that a drift in the machine's speed falls on both alike)."""
    keys = ("new_tokens", "target_calls", "drafted", "accepted", "overlap_sum", "overlap_rows", "seconds", "rejected",
            "lookup_seconds")
    total = dict.fromkeys(keys, 0)
    lists = dict.fromkeys(("accept_hist", "draft_len_hist", "judged_by_depth", "accepted_by_depth",
                           "draft_rows_hist"), [])
    same, first_diffs, matched, by_source, cycles, choices, promise = 0, [], [], {}, [], {}, {}
    paired = baseline is None
    per_prompt = []  # [new tokens, seconds, verify calls, the baseline's new tokens, its seconds]: the intervals'
    if paired:
        baseline = {"tokens": [], "new_tokens": 0, "seconds": 0.0, "seconds_each": []}
    for i, p in enumerate(prompts):
        if paired:
            one = run_baseline(model, [p], cell.policy, max_new_tokens, seed, eos, first=i)
            baseline["tokens"] += one["tokens"]
            baseline["new_tokens"] += one["new_tokens"]
            baseline["seconds"] += one["seconds"]
            baseline["seconds_each"] += one["seconds_each"]
        g = torch.Generator(p["input_ids"].device).manual_seed(prompt_seed(seed, i))
        out, s = speculative_generate(model, p["input_ids"], max_new_tokens, cell.drafting, Policy(**cell.policy),
                                      eos_token_id=eos, generator=g)
        for k in keys:
            total[k] += s[k]
        per_prompt.append([s["new_tokens"], round(s["seconds"], 6), s["target_calls"], len(baseline["tokens"][i]),
                           round(baseline["seconds_each"][i], 6)])
        matched += s["lookup_matched"]
        by_source = {k: by_source.get(k, 0) + n for k, n in s["source_counts"].items()}
        choices = {k: choices.get(k, 0) + n for k, n in s.get("auto_choices", {}).items()}  # auto: cycles by choice
        for k, kept in s.get("auto_promise", {}).items():  # auto: cycles, tokens promised and committed by choice
            promise[k] = [a + b for a, b in zip(promise.get(k, (0, 0.0, 0)), kept)]
        cycles += list(zip(s["cycle_kinds"], s["per_cycle_drafted"]))
        for k in lists:
            lists[k] = add_lists(lists[k], s.get(k, []))
        diff = first_difference(out, baseline["tokens"][i])
        same += diff is None
        first_diffs += [] if diff is None else [diff]
    if paired:
        baseline["tokens_per_s"] = baseline["new_tokens"] / baseline["seconds"] if baseline["seconds"] else 0.0
    drafted, calls = total["drafted"], total["target_calls"]
    hist, len_hist = lists["accept_hist"], lists["draft_len_hist"]
    # over the drafted tokens (a chain) or the expanded nodes (a tree)
    overlap = total["overlap_sum"] / total["overlap_rows"] if total["overlap_rows"] else None
    rate = total["accepted"] / drafted if drafted else None
    judged = total["accepted"] + total["rejected"]
    alpha = total["accepted"] / judged if judged else None  # the formula's a: P(accept | the drafts before were)
    by_depth = [a / j if j else None for a, j in zip(lists["accepted_by_depth"], lists["judged_by_depth"])]
    tps = total["new_tokens"] / total["seconds"] if total["seconds"] else 0.0
    draft_s, full_s, verify_s, draft_rows_s = times
    c = draft_s / full_s
    # v: a cycle's verification (d drafts or nodes: d + 1 tokens) over a one-token step, averaged over the cycles
    v = sum(n * verify_s.get(d + 1, full_s) for d, n in enumerate(len_hist)) / max(sum(len_hist), 1) / full_s
    rows = lists["draft_rows_hist"]  # a tree's draft steps by their rows, each at its measured cost
    draft_cost = sum(n * draft_rows_s.get(r, draft_s) for r, n in enumerate(rows)) / full_s
    c_lookup = total["lookup_seconds"] / max(calls, 1) / full_s if SOURCES[cell.draft].lookup else None
    kind = SOURCES[cell.draft]
    if kind.lookup or not kind.exit:  # cycles of several kinds, deterministic trees: each at its measured cost
        predicted = predicted_mixed_speedup(total["new_tokens"], cycles, lambda k: verify_s.get(k, full_s) / full_s,
                                            c, draft_cost, total["lookup_seconds"] / full_s)
    elif cell.tree_width == 1:
        predicted = predicted_speedup(alpha, cell.gamma, c, len_hist, v)
    else:
        predicted = predicted_tree_speedup(by_depth, draft_cost / max(calls, 1), v)
    return {
        **asdict(cell), "prompts": len(prompts),
        "new_tokens": total["new_tokens"], "target_calls": calls, "drafted": drafted, "accepted": total["accepted"],
        "avg_accepted": total["accepted"] / calls if calls else 0.0, "acceptance_rate": rate, "alpha": alpha,
        "avg_overlap": overlap, "avg_tv": 1.0 - overlap if overlap is not None else None, "accept_hist": hist,
        "avg_draft_len": drafted / calls if calls else 0.0, "draft_len_hist": len_hist,
        "tokens_per_cycle": total["new_tokens"] / calls if calls else None, "accept_by_depth": by_depth,
        "draft_rows_hist": lists["draft_rows_hist"] or None,
        "matches_baseline": same == len(prompts) if cell.temperature == 0 else None,
        "greedy_match": f"{same}/{len(prompts)}" if cell.temperature == 0 else None,
        "first_diff_mean": statistics.fmean(first_diffs) if cell.temperature == 0 and first_diffs else None,
        "baseline_new_tokens": baseline["new_tokens"],
        "seconds": total["seconds"], "tokens_per_s": tps,
        "baseline_seconds": baseline["seconds"], "baseline_tokens_per_s": baseline["tokens_per_s"],
        "speedup": tps / baseline["tokens_per_s"] if baseline["tokens_per_s"] else None,
        "draft_step_ms": 1e3 * draft_s, "full_step_ms": 1e3 * full_s, "c": c, "v": v,
        "predicted_speedup": predicted, "paired_baseline": paired,
        "lookup_match_rate": sum(matched) / len(matched) if matched else None, "c_lookup": c_lookup,
        "lookup_seconds": total["lookup_seconds"], "tokens_by_source": by_source, "per_prompt": per_prompt,
        **({"auto_choices": choices, "nodes_per_cycle": drafted / calls if calls else None,
            "auto_promise": {k: [n, round(p / n, 3), round(t / n, 3)] for k, (n, p, t) in promise.items() if n}}
           if choices else {}),
    }


def add_lists(a, b):
    """Element-wise sum of two count lists of any lengths."""
    return [x + y for x, y in itertools.zip_longest(a, b, fillvalue=0)]


# ----------------------------------------------------------------------------------------------------------------
# Cells across processes: split by their cost, so that every process finishes at about the same time

# The collectives' timeout (NCCL's default, 10 minutes, would abort a sound sweep: a process that is done waits at the
# last barrier for the others' last cells, whose costs are guesses). torchrun stops every process when one fails.
WAIT_TIMEOUT = timedelta(hours=12)


def cell_cost(cell, num_layers, baseline=0.0):
    """A cell's guessed time in full steps per generated token (all cells generate as many tokens): results.py's
    cost model with drafts accepted with probability L/N (a lookup's: 1/2), a draft step L/N of a full step (a
    lookup's: free), a verification of k tokens 1 + k/16 steps; plus `baseline`, its share of the autoregressive
    baseline's step a token (all of it when paired, else a share of the one its exit and policy run once)."""
    a, c = (0.5, 0.0) if not SOURCES[cell.draft].exit else (cell.exit_layer / num_layers,) * 2
    verify = 1 + ((cell.tree_nodes or cell.tree_width * cell.gamma) + 1) / 16
    return (cell.gamma * c + verify) / tokens_per_cycle(a, cell.gamma) + baseline


def split_cells(costs, world):
    """The cells (indices into `costs`) of each of `world` processes, in index order: longest processing time first
    (each cell, costliest first, to the least loaded process; ties to the lower index and rank), so the busiest has
    at most 4/3 of the least possible work. Deterministic: every process computes the same split."""
    load, parts = [0.0] * world, [[] for _ in range(world)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        load[r] += costs[i]
        parts[r].append(i)
    return [sorted(p) for p in parts]


# ----------------------------------------------------------------------------------------------------------------
# The teacher-forced layer sweep: one pass per batch of held-out text gives every layer's untrained exit at once.


def _overlap_sum(p_logits, q_logits, temperature, chunk=1024):
    """sum over rows of sum_x min(p, q) at `temperature` (the expected acceptance of one drafted token)."""
    total = 0.0
    for i in range(0, p_logits.shape[0], chunk):
        p = torch.softmax(p_logits[i:i + chunk].float() / temperature, -1)
        q = torch.softmax(q_logits[i:i + chunk].float() / temperature, -1)
        total += torch.minimum(p, q).sum().item()
    return total


@torch.no_grad()
def layer_sweep(base, checkpoints, blocks, temperatures, batch_size, pad_id, rank=0, world=1, gather=None):
    """Teacher-forced metrics of the untrained exit at every layer 1..N-1 and of each checkpoint (name, exit) at its
    layer, on the loss-masked positions of `blocks`. The metrics are train.py's validation metrics (KL, top-1
    agreement, overlap at T=1 and 0.7, perplexities) plus the overlap at any other temperature asked for; TV is
    1 - overlap. Returns one row per (exit, layer). Several processes share the work: process `rank` of `world` runs
    every world-th batch, and `gather` (accelerate's gather_object) hands all of them every batch's sums, added in
    batch order: the one-process rows to the last bit, and no process idles at a barrier while one runs it all."""
    from data_utils import collate
    from truncated_llama import TruncatedLlama
    n = base.config.num_hidden_layers
    extra = sorted({float(t) for t in temperatures if t > 0 and float(t) not in (0.7, 1.0)})
    exits = [("untrained", layer, None) for layer in range(1, n)] + [(name, e.exit_layer, e) for name, e in checkpoints]
    probe = TruncatedLlama(base, 1)
    device = base.device
    starts = range(0, len(blocks), batch_size)
    mine = {}  # batch start -> each exit's sums (Python floats: they pickle the same from any device)
    for b in starts[rank::world]:
        batch = {k: v.to(device) for k, v in collate(blocks[b:b + batch_size], pad_id).items()}
        ids, attn = batch["input_ids"], batch["attention_mask"]
        attn = None if bool(attn.all()) else attn
        rows = target_rows(batch)
        if not rows.any():
            continue
        labels = ids[:, 1:][rows]
        out = probe(ids, attn, all_hidden_states=True)
        teacher = out.logits[:, :-1][rows]
        mine[b] = []
        for name, layer, exit in exits:
            if exit is None:
                logits = base.lm_head(base.model.norm(out.hidden_states[layer][:, :-1][rows]))
            else:
                logits = TruncatedLlama(base, layer, exit)(ids, attn).exit_logits[:, :-1][rows]
            s = exit_metric_sums(teacher, logits, None, labels)
            mine[b].append({**s, **{f"overlap_t{t:g}": _overlap_sum(teacher, logits, t) for t in extra}})
    every = {b: s for part in (gather([mine]) if gather else [mine]) for b, s in part.items()}
    sums = [None] * len(exits)
    for b in sorted(every):  # in batch order, as one process adds them
        sums = [s if total is None else {k: total[k] + v for k, v in s.items()} for total, s in zip(sums, every[b])]
    result = []
    for (name, layer, _), s in zip(exits, sums):
        if s is None:
            continue
        row = {"exit": name, "exit_layer": layer, **summarize_metrics(s)}
        for t in extra:
            row[f"overlap_t{t:g}"] = s[f"overlap_t{t:g}"] / max(s["tokens"], 1.0)
        for key in [k for k in row if k.startswith("overlap_t")]:
            row["tv_" + key[len("overlap_"):]] = 1.0 - row[key]
        result.append(row)
    return result


# ----------------------------------------------------------------------------------------------------------------
# The command line


def build_parser():
    p = Parser(prog="evaluate.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
               description="The self-speculation sweep: every cell (exit, L, gamma, policy) against an autoregressive "
                           "baseline, a teacher-forced sweep of every layer, and the plots. List flags take several "
                           "space-separated values.")
    g = p.add_argument_group("grid")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="the alias smollm2-135m, a local directory or a Hugging Face id")
    g.add_argument("--exit_layers", nargs="*", default=None, metavar="L",
                   help="untrained exits at these layers: values and/or inclusive ranges start:stop[:step] such as "
                        "4:28:4 (default: every 4th layer, 4..N-1; give the flag with no value for none)")
    g.add_argument("--exit_ckpt", nargs="+", default=[], metavar="DIR",
                   help="trained exit directories written by train.py (each at its own layer)")
    g.add_argument("--gammas", nargs="+", type=int, default=[2, 4, 8, 16], help="draft lengths")
    g.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 0.7, 1.0], help="0 means greedy")
    g.add_argument("--top_p", nargs="+", type=float, default=[0.95], help="nucleus mass in (0, 1] (greedy ignores it)")
    g.add_argument("--top_k", nargs="+", type=int, default=[0], help="top-k, 0 = off (greedy ignores it)")
    g.add_argument("--draft_stop", nargs="+", type=float, default=[0.0], metavar="P",
                   help="adaptive draft length, each in [0, 1): a cycle stops drafting when the draft's top "
                        "probability (its policy's q; greedy: the temperature-1 softmax) is below P, gamma being the "
                        "cap (0: always gamma drafts)")
    g.add_argument("--tree_widths", nargs="+", type=int, default=[1], metavar="K",
                   help="draft trees: each expanded node proposes its K most likely tokens, the K likeliest paths are "
                        "kept per level, to depth gamma; all verified in one pass (1: a chain; lean engine only)")
    g.add_argument("--tree_nodes", nargs="+", type=int, default=[0], metavar="N",
                   help="a tree's node budget per cycle (0: width x gamma)")
    g.add_argument("--drafts", nargs="+", default=["exit"], choices=DRAFTS, metavar="SOURCE",
                   help="draft sources: exit (the early exit), lookup (prompt lookup: the tokens that followed the "
                        "newest n-gram's latest earlier occurrence; needs no exit, run once, as chains of up to gamma "
                        "tokens), exit+lookup (a chain: the lookup's proposal when it matches, else the exit's; a "
                        "tree: the exit's tree with the lookup's path grafted on) and recycle (a tree of depth gamma "
                        "from the target's own top next tokens of earlier passes, --tree_widths children a node; needs "
                        "no exit) and auto (each cycle, a tree of lookup's path and recycled predictions, the exit's "
                        "chain or nothing, whichever promises most tokens per unit of the measured step costs)")
    g.add_argument("--lookup_tokens", nargs="+", type=int, default=[0], metavar="K",
                   help="exit+lookup: the lookup's proposal length (0: gamma; the exit drafts gamma)")
    g.add_argument("--ngram", type=int, default=3, help="the lookup's longest n-gram (it tries n = this .. 1)")
    g = p.add_argument_group("prompts and held-out text")
    g.add_argument("--dataset", nargs="+", default=["sharegpt"],
                   help="prompt sets, each a cell dimension with its own tables, plots and best line: sharegpt | "
                        "xsum | slimpajama (their test split) | sharegpt:code, sharegpt:given_text, sharegpt:open "
                        "(ShareGPT's held-out prompts by task, share_gpt_dataset.task_group) | sharegpt:tasks (all "
                        "three) | a prompts.jsonl file whose lines are {\"prompt\": ...} or {\"messages\": [...]} | "
                        "the field's per-task question.jsonl ({\"question_id\", \"category\", \"turns\"}: one set "
                        "per task, MT-bench's eight categories as conversation; PATH:TASK for one); the "
                        "teacher-forced sweep uses the first")
    g.add_argument("--data_files", default=None,
                   help="local JSON/JSONL/Parquet files of --dataset instead of the default")
    g.add_argument("--dataset_id", default=None, help="a Hugging Face dataset id of --dataset instead of the default")
    g.add_argument("--skip_bad_lines", action="store_true",
                   help="skip (and count) malformed lines and records without a usable prompt in the files given by "
                        "--dataset / --data_files, instead of stopping at the first one")
    g.add_argument("--num_prompts", type=int_at_least(1), default=16,
                   help="prompts per cell (fewer prompts within --max_prompt_tokens is an error)")
    g.add_argument("--max_prompt_tokens", type=int_at_least(1), default=256, help="longer prompts are skipped")
    g.add_argument("--max_new_tokens", type=int_at_least(1), default=128, help="tokens generated per prompt")
    g.add_argument("--seed", type=int, default=0, help="prompt choice and sampling (one generator per prompt)")
    g.add_argument("--tf_blocks", type=int_at_least(0), default=16,
                   help="held-out blocks for the teacher-forced layer sweep, drawn at random (seed 0) from across the "
                        "first --dataset's test split or file (0: skip it)")
    g.add_argument("--tf_seq_len", type=int_at_least(2), default=256, help="tokens per teacher-forced block")
    g.add_argument("--tf_batch_size", type=int_at_least(1), default=4, help="teacher-forced blocks per forward pass")
    g = p.add_argument_group("output and runtime")
    g.add_argument("--out_dir", default="out/eval", help="where results, tables and plots go")
    g.add_argument("--resume", action="store_true",
                   help="continue the sweep in --out_dir, skipping every finished cell (needed when it holds results)")
    g.add_argument("--paired_baseline", action="store_true",
                   help="every cell times its own autoregressive baseline, prompt by prompt in turns with its "
                        "speculative runs (twice the time; immune to drifts in the machine's speed between cells)")
    g.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="also time transformers' generate beside our autoregressive loop, once per prompt set and "
                        "policy, on the same prompts (default on; the rows then carry both tokens/s and "
                        "speedup_vs_generate)")
    g.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                   help="auto: the GPU when there is one (one per process), else CPU")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="weights and activations; auto: bfloat16 on a GPU or CPU with native bf16, else float32")
    g.add_argument("--engine", choices=ENGINES, default="auto",
                   help="generation steps: lean (decode_engine.py), hf (transformers' layers), auto: lean if it can")
    g.add_argument("--stop_after", type=int_at_least(0), default=0,
                   help="stop after this many cells, unmerged, as if killed (for testing --resume; 0: off)")
    g.add_argument("--best_line", nargs="+", default=None, metavar="DIR",
                   help="run nothing: print the best lossless speedup among the cells in DIR/results.jsonl (the "
                        "line every sweep ends with) and exit")
    return p


def check_args(args):
    """Every check that needs no model: raise UsageError naming the flag."""
    try:
        for g in args.gammas:
            check_policy(gamma=g)
        for t, p, k in itertools.product(args.temperatures, args.top_p, args.top_k):
            check_policy(temperature=t, top_p=p, top_k=k)
        for s in args.draft_stop:
            check_policy(draft_stop=s)
        for w, m in itertools.product(args.tree_widths, args.tree_nodes):
            check_policy(tree_width=w, tree_nodes=m)
        for d, k in itertools.product(args.drafts, args.lookup_tokens):
            check_policy(draft=d, lookup_tokens=k, ngram=args.ngram)
    except ValueError as e:
        raise UsageError(str(e)) from None
    groups = [f"sharegpt:{g}" for g in TASK_GROUPS] + [TASKS]
    for d in args.dataset:
        if d not in DATASETS and d not in groups and not Path(d).is_file() and not question_set(d):
            raise UsageError(f"--dataset: {d!r} is neither {', '.join(DATASETS)}, {', '.join(groups)} nor an "
                             "existing prompts .jsonl file (or a question.jsonl file's PATH:TASK).")
    resolve_device(args.device)
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out_dir: {out} exists and is not a directory.")
    if results_files(out) and not args.resume:
        raise UsageError(f"--out_dir: {out} already holds the results of a sweep; pass --resume to continue it, "
                         "or choose another --out_dir.")
    parse_layers(args.exit_layers)  # the syntax; the range is checked once the model is loaded


def _file_hash(*paths):
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _tensor_hash(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Sweep:
    """Everything a sweep runs on, loaded and checked before anything is written."""
    base: object
    tok: object
    checkpoints: list      # (path, EarlyExit) of each --exit_ckpt
    exit_ids: dict         # exit name -> a hash of its files ("untrained" for the plain exits)
    prompts: dict          # prompt set ("" when there is one --dataset) -> its prompts
    blocks: list           # held-out blocks for the teacher-forced sweep
    exits: list            # (exit name, layer)
    cells: list
    ids: list              # each cell's id
    fingerprint: str
    dtype_name: str
    machine: dict


def load_sweep(args, device):
    """The model, the exits, the prompts and the cells; raises UsageError & co for anything that does not fit."""
    from truncated_llama import load_base_model, machine_info, model_fingerprint, resolve_dtype
    from checkpoints import CONFIG_FILE, WEIGHTS_FILE, load_exit

    dtype, dtype_name = resolve_dtype(args.dtype, device)
    base, tok = load_base_model(args.model, dtype=dtype, device=device)
    layers = parse_layers(args.exit_layers, base.config.num_hidden_layers)
    if args.tf_blocks:
        check_context(base.config, "--tf_seq_len", args.tf_seq_len)
    fingerprint = model_fingerprint(base)
    checkpoints, exit_ids = [], {"untrained": "untrained"}
    for path in dict.fromkeys(args.exit_ckpt):
        exit, _ = load_exit(path, base, base_fingerprint=fingerprint)
        checkpoints.append((path, exit.requires_grad_(False).eval()))
        exit_ids[path] = _file_hash(Path(path) / CONFIG_FILE, Path(path) / WEIGHTS_FILE)
    if any(SOURCES[d].exit for d in args.drafts) and not layers and not checkpoints:
        raise UsageError("--exit_layers/--exit_ckpt: there is no exit to evaluate; give layers or checkpoints.")
    names = dataset_names(args.dataset)
    prompts, blocks = {}, []
    for i, name in enumerate(names):  # the teacher-forced sweep's blocks come from the first prompt set
        ps, b = load_eval_data(args, tok, name, args.tf_blocks if i == 0 else 0)
        prompts[name if len(names) > 1 else ""] = [{**p, "input_ids": p["input_ids"].to(device)} for p in ps]
        blocks = blocks or b
    check_context(base.config, "--max_new_tokens", args.max_new_tokens, prompt_name="the longest prompt",
                  prompt=max(p["input_ids"].shape[1] for ps in prompts.values() for p in ps))
    exits = [("untrained", L) for L in layers] + [(path, e.exit_layer) for path, e in checkpoints]
    if max(args.tree_widths) > 1 and (args.engine == "hf" or not decode_engine.supports(base)):
        raise UsageError(trees_need_lean("--tree_widths"))
    cells = make_cells(exits, args.gammas, args.temperatures, args.top_p, args.top_k, args.draft_stop,
                       args.tree_widths, args.tree_nodes, args.drafts, args.lookup_tokens, args.ngram, list(prompts))
    context = {"model": args.model, "model_fingerprint": fingerprint, "dtype": dtype_name, "exit_ids": exit_ids,
               "prompts": {k: _tensor_hash([p["input_ids"] for p in ps]) for k, ps in prompts.items()},
               "max_new_tokens": args.max_new_tokens,
               "seed": args.seed, **({"paired_baseline": True} if args.paired_baseline else {}),
               **({"device": device.type} if device.type != "cpu" else {})}
    return Sweep(base, tok, checkpoints, exit_ids, prompts, blocks, exits, cells,
                 [cell_id(c, context) for c in cells], fingerprint, dtype_name, machine_info(device))


def teacher_forced(args, sw, out_dir, say, state):
    """The teacher-forced layer sweep's rows: kept from layer_sweep.jsonl when it holds this sweep's, else run,
    shared by every process (`state`: accelerate's PartialState); the main process writes them."""
    from accelerate.utils import gather_object
    eos = sw.tok.eos_token_id
    tf_id = hashlib.sha256(json.dumps([sw.fingerprint, sw.dtype_name, [sw.exit_ids[p] for p, _ in sw.checkpoints],
                                       _tensor_hash([b["input_ids"] for b in sw.blocks]),
                                       sorted(args.temperatures)]).encode()).hexdigest()[:16]
    tf_rows = read_rows(out_dir / f"{LAYER_SWEEP}.jsonl", key=None)
    if len(tf_rows) == sw.base.config.num_hidden_layers - 1 + len(sw.checkpoints) and \
            all(r.get("sweep_id") == tf_id for r in tf_rows):
        say(f"teacher-forced sweep: kept the {len(tf_rows)} rows already in {LAYER_SWEEP}.jsonl")
        return tf_rows
    t = time.perf_counter()
    pad = sw.tok.pad_token_id if sw.tok.pad_token_id is not None else (eos if isinstance(eos, int) else 0)
    share = dict(rank=state.process_index, world=state.num_processes, gather=gather_object)
    tf_rows = [{**r, "sweep_id": tf_id} for r in layer_sweep(sw.base, sw.checkpoints, sw.blocks, args.temperatures,
                                                              args.tf_batch_size, pad, **share)]
    if state.is_main_process:
        write_atomically(out_dir / f"{LAYER_SWEEP}.jsonl", "".join(json.dumps(r) + "\n" for r in tf_rows))
        write_table(out_dir / f"{LAYER_SWEEP}.csv", tf_rows, list(tf_rows[0]))
    say(f"teacher-forced sweep: {len(tf_rows)} rows (exit x layer) on {tf_rows[0]['tokens']} tokens "
        f"in {time.perf_counter() - t:.0f} s")
    return tf_rows


def run_grid(args, sw, mine, own, meta, main, say):
    """Run this process's cells (indices `mine`), appending each finished row to `own`. False when --stop_after
    stopped it early."""
    from tqdm import tqdm
    from truncated_llama import TruncatedLlama

    trained, eos = dict(sw.checkpoints), sw.tok.eos_token_id
    everything = [p for ps in sw.prompts.values() for p in ps]
    first = sw.cells[mine[0]] if mine else None
    if mine:
        warm = TruncatedLlama(sw.base, first.exit_layer or 1, trained.get(first.exit), engine=args.engine)
        few, ids = min(8, args.max_new_tokens), everything[0]["input_ids"]
        speculative_generate(warm, ids, few, Drafting(gamma=2))  # first calls allocate; keep them untimed
        if max(args.tree_widths) > 1:
            speculative_generate(warm, ids, few, Drafting(gamma=2, tree_width=max(args.tree_widths)))
        autoregressive_generate(warm, ids, few)
    long_prompt = max((p["input_ids"] for p in everything), key=lambda x: x.shape[1])
    timing_ids = torch.cat([long_prompt, long_prompt[:, -1:].expand(1, args.max_new_tokens // 2)], dim=1)
    baselines, times, model, model_key, peers = {}, {}, None, None, {}
    bar = tqdm(total=len(mine), disable=not main, desc="cells", dynamic_ncols=True)
    for count, i in enumerate(mine):
        cell = sw.cells[i]
        key = (cell.exit, cell.exit_layer)
        if key != model_key:  # cells come grouped by exit; the baselines are re-timed for each exit (see below)
            model, model_key, baselines = TruncatedLlama(sw.base, cell.exit_layer or 1, trained.get(cell.exit),
                                                         engine=args.engine), key, {}  # lookup: no exit runs
        if key not in times:
            biggest = max(make_source(c.drafting, [0]).max_rows for c in sw.cells)  # the most rows a cycle verifies
            times[key] = step_times(model, timing_ids, range(2, biggest + 2),
                                    draft_sizes=range(2, max(args.tree_widths) + 1))
        remember_costs(model, *times[key][:3])  # what --drafts auto weighs its proposals by
        prompts = sw.prompts[cell.prompt_set]
        pkey = (cell.prompt_set, *cell.policy.values())
        if pkey not in baselines and not args.paired_baseline:  # once per exit and policy, just before its cells
            baselines[pkey] = run_baseline(model, prompts, cell.policy, args.max_new_tokens, args.seed, eos)
        if args.peer and pkey not in peers:  # once per prompt set and policy: generate does not depend on the exit
            peers[pkey] = run_peer(model, prompts, cell.policy, args.max_new_tokens, args.seed, eos)
        row = run_cell(model, cell, prompts, args.max_new_tokens, args.seed, eos, baselines.get(pkey), times[key])
        if args.peer:  # the speedup over generate: ours over our loop, times our loop over generate (each paired)
            vs = peers[pkey]["ar_vs_generate"]
            row.update(peers[pkey], speedup_vs_generate=row["speedup"] * vs if row["speedup"] and vs else None)
        dataset = {"dataset": cell.prompt_set} if cell.prompt_set else {}
        append_row(own, {"cell_id": sw.ids[i], "index": i, **meta, **dataset, "engine": model.describe_engine(),
                         **row})
        bar.update()
        bar.set_postfix(draft=cell.draft, exit=f"L{cell.exit_layer}", gamma=cell.gamma, T=cell.temperature,
                        speedup=f"{row['speedup']:.2f}")
        if args.stop_after and count + 1 >= args.stop_after:
            bar.close()
            say(f"stopped after {count + 1} cells (--stop_after); rerun with --resume to finish")
            return False
    bar.close()
    return True


def write_summary(args, sw, out_dir, tf_rows, say):
    """Merge the results files; write the tables and plots; print the table and the best line. Returns the rows."""
    rows = merge_results(out_dir, sw.ids)
    write_table(out_dir / SUMMARY_CSV, rows, SUMMARY_COLUMNS)
    command = " ".join(["python evaluate.py", *getattr(args, "argv", [])])
    if tf_rows is None:
        tf_rows = read_rows(out_dir / f"{LAYER_SWEEP}.jsonl", key=None)
    from plots import make_plots
    sets, parts, plots = prompt_sets(rows), [], []
    for name in sets:  # one table, one set of plots (in a folder of their own when there are several) and a best line
        some = [r for r in rows if r.get("prompt_set") == name]
        where = out_dir / _folder(name) if len(sets) > 1 else out_dir
        where.mkdir(parents=True, exist_ok=True)
        plots += make_plots(some, tf_rows if name == sets[0] else [], where, Path(args.model).name)
        parts.append((f"## {name}\n\n" if len(sets) > 1 else "") + markdown_table(some)
                     + (f"\n{best_line(some)}\n" if len(sets) > 1 else ""))
    table = "\n".join(parts)
    write_atomically(out_dir / SUMMARY_MD, f"# Self-speculation sweep\n\n`{command}`\n\n{table}")
    print(table)
    say(f"{len(rows)} cells in {out_dir / RESULTS}; {SUMMARY_CSV}, {SUMMARY_MD}"
        f"{', ' + LAYER_SWEEP + '.jsonl/.csv' if tf_rows else ''} and {len(plots)} plots in {out_dir}")
    print(best_line(rows), flush=True)
    return rows


def _folder(prompt_set):
    """A folder name for a prompt set's plots: sharegpt:code -> sharegpt_code, data/qa.jsonl -> qa,
    data/question.jsonl:rag -> question_rag."""
    if prompt_set and question_set(prompt_set):
        path, task = question_set(prompt_set)
        return f"{Path(path).stem}_{task}"
    return Path(prompt_set).stem.replace(":", "_") if prompt_set else "all"


def run(args, stop=None):
    """The sweep as the flags say (see the module docstring). Returns this sweep's rows on the main process.
    `stop` (a data_utils.SignalStop) is told what a SIGINT or SIGTERM would keep."""
    from accelerate import PartialState
    from truncated_llama import dtype_line

    t_start = time.perf_counter()
    stop = stop if stop is not None else SignalStop()
    check_args(args)
    cpu = resolve_device(args.device).type == "cpu"
    state = PartialState(cpu=cpu, timeout=WAIT_TIMEOUT)
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    device = torch.device("cpu") if cpu else state.device
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if main else (lambda *a: None)

    sw = load_sweep(args, device)  # everything is loaded and checked before anything is written
    out_dir = Path(args.out_dir)
    done = finished_cells(out_dir, sw.ids)
    todo = [i for i, cid in enumerate(sw.ids) if cid not in done]
    shared = lambda c: (c.exit, c.exit_layer, c.prompt_set, *c.policy.values())  # cells that share a baseline
    share = Counter(shared(sw.cells[i]) for i in todo)
    costs = [cell_cost(sw.cells[i], sw.base.config.num_hidden_layers,
                       1.0 if args.paired_baseline else 1 / share[shared(sw.cells[i])]) for i in todo]
    mine = [todo[j] for j in split_cells(costs, world)[rank]]
    stop.kept = lambda: (f"kept {len(finished_cells(out_dir, sw.ids))} of {len(sw.ids)} cells in {out_dir} "
                         "(the cell in progress is dropped)")  # what a SIGINT or SIGTERM keeps, on disk
    stop.resumable = True
    state.wait_for_everyone()  # every process has read the same finished cells before any process writes
    stops, gammas = len(set(args.draft_stop)), len(set(args.gammas))
    trees = len({(c.tree_width, c.tree_nodes) for c in sw.cells})
    say(dtype_line(args.dtype, sw.dtype_name, sw.machine))  # after every check: an error stays the only line
    drafts = f" x {len(args.drafts)} draft sources" if len(args.drafts) > 1 else ""
    sets = f" x {len(sw.prompts)} prompt sets" if len(sw.prompts) > 1 else ""
    say(f"{len(sw.cells)} cells ({len({c.exit for c in sw.cells})} exits{drafts}{sets} x {gammas} gammas x "
        f"{len({(c.temperature, c.top_p, c.top_k) for c in sw.cells})} policies"
        f"{f' x {stops} draft stops' if stops > 1 else ''}{f' x {trees} trees' if trees > 1 else ''}) on "
        f"{len(next(iter(sw.prompts.values())))} prompts "
        f"x {args.max_new_tokens} new tokens; {len(sw.cells) - len(todo)} already done, {len(todo)} to run on "
        f"{world} process(es)")

    out_dir.mkdir(parents=True, exist_ok=True)
    own = out_dir / (RESULTS if world == 1 else f"results.rank{rank}.jsonl")
    repair_tail(own)
    meta = {"model": args.model, "dataset": args.dataset[0], "max_new_tokens": args.max_new_tokens, "seed": args.seed,
            "dtype": sw.dtype_name, "device": device.type, **sw.machine}
    tf_rows = teacher_forced(args, sw, out_dir, say, state) if sw.blocks else None
    if not run_grid(args, sw, mine, own, meta, main, say):
        return None
    state.wait_for_everyone()
    rows = write_summary(args, sw, out_dir, tf_rows, say) if main else None
    say(f"sweep done in {time.perf_counter() - t_start:.0f} s")
    state.wait_for_everyone()
    state.destroy_process_group()
    return rows


def print_best_line(out_dirs):
    """--best_line DIR [DIR ...]: the best line of the cells in the DIRs' results files (merged, each cell once)."""
    rows = []
    for out_dir in out_dirs:
        if not results_files(out_dir):
            raise UsageError(f"--best_line: {out_dir} holds no {RESULTS} of a sweep.")
        rows += read_results(out_dir)
    line = best_line(rows)
    print(line, flush=True)
    return line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    body = (lambda stop: print_best_line(args.best_line)) if args.best_line is not None else partial(run, args)
    return run_command("evaluate.py", argv, body, errors=(ModelLoadError, CheckpointError))


if __name__ == "__main__":
    main()
