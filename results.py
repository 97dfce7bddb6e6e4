"""The sweep's results: files, tables, labels, one generation's stats and the cost model, shared by the loop
(generate.py), the sweep (evaluate.py) and its plots.

    results.jsonl      one JSON line per cell, appended in one write; per-process results.rank*.jsonl merged at the end
    summary.csv/.md    the same as tables
    layer_sweep.jsonl  the teacher-forced metrics of every exit at every layer

The cost model (Leviathan et al., 2023): a cycle of d drafts, each accepted with probability a given the ones before
it, yields (1 - a^(d+1)) / (1 - a) tokens and costs d c + v autoregressive steps (c: draft step / full step; v: the
verification of d drafts / a one-token full step).
"""
import csv
import functools
import io
import json
import math
import os
import random
from pathlib import Path
from typing import Optional

from checkpoints import write_atomically
from drafts import SOURCES


RESULTS, SUMMARY_CSV, SUMMARY_MD = "results.jsonl", "summary.csv", "summary.md"
LAYER_SWEEP = "layer_sweep"
# Fields that depend on the machine and the moment; everything else in a row is a pure function of the cell.
TIMING_FIELDS = ("seconds", "tokens_per_s", "baseline_seconds", "baseline_tokens_per_s", "speedup",
                 "peer_ar_tokens_per_s", "generate_tokens_per_s", "ar_vs_generate", "speedup_vs_generate",
                 "draft_step_ms", "full_step_ms", "c", "v", "predicted_speedup", "c_lookup", "lookup_seconds",
                 "cpu", "cpu_flags", "threads", "torch", "gpu", "engine", "per_prompt")  # the machine, and the forms it measured
SUMMARY_COLUMNS = ("prompt_set", "draft", "exit", "exit_layer", "gamma", "lookup_tokens", "ngram", "temperature", "top_p", "top_k", "draft_stop", "tree_width",
                   "tree_nodes", "tokens_per_cycle", "accept_by_depth", "prompts",
                   "new_tokens", "target_calls", "drafted", "accepted", "avg_accepted", "acceptance_rate", "alpha",
                   "avg_overlap", "avg_tv", "accept_hist", "avg_draft_len", "draft_len_hist", "matches_baseline",
                   "greedy_match", "first_diff_mean", "seconds", "tokens_per_s", "baseline_new_tokens",
                   "baseline_seconds", "baseline_tokens_per_s", "speedup", "peer_ar_tokens_per_s",
                   "generate_tokens_per_s", "ar_vs_generate", "speedup_vs_generate", "generate_greedy_match",
                   "draft_step_ms", "full_step_ms", "c",
                   "v", "lookup_match_rate", "c_lookup", "tokens_by_source", "auto_choices", "auto_promise",
                   "predicted_speedup",
                   "cell_id")


def read_rows(path, key="cell_id"):
    """The complete rows of a JSONL results file (none if it is missing): JSON objects holding `key` (any object
    when key is None). A line cut off by a kill, or otherwise unreadable, is ignored."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and (key is None or key in row):
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Results files: one JSON line per cell, appended in one write; merged (and sorted) by rank 0 at the end


def results_files(out_dir):
    """results.jsonl and any per-process results.rank*.jsonl of an interrupted multi-process run."""
    out_dir = Path(out_dir)
    return [p for p in [out_dir / RESULTS, *sorted(out_dir.glob("results.rank*.jsonl"))] if p.is_file()]


def read_results(out_dir):
    """Every cell's row in out_dir's results files, each cell once (results.jsonl's row first, then the per-process
    files'), in file order: what a finished or interrupted sweep holds."""
    rows = {}
    for path in results_files(out_dir):
        for row in read_rows(path):
            rows.setdefault(row["cell_id"], row)
    return list(rows.values())


def finished_cells(out_dir, ids):
    """The cells among `ids` with a row in out_dir's results files."""
    return {r["cell_id"] for path in results_files(out_dir) for r in read_rows(path)} & set(ids)


def append_row(path, row):
    """Append one complete line with a single write, flushed to disk: a kill leaves whole lines, or a partial last
    line that `read_rows` skips and `repair_tail` removes before the next append."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_tail(path):
    """Cut a partial last line (left by a kill in the middle of a write) off a results file."""
    path = Path(path)
    if path.is_file() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


def merge_results(out_dir, ids):
    """Merge results.jsonl and the per-process files into results.jsonl: each cell once, this sweep's cells first in
    cell order (rows of other sweeps kept after them). Returns this sweep's rows."""
    out_dir = Path(out_dir)
    files = results_files(out_dir)
    rows = {}
    for path in files:
        for row in read_rows(path):
            rows.setdefault(row["cell_id"], row)
    order = {cid: i for i, cid in enumerate(ids)}
    merged = sorted(rows.values(), key=lambda r: order.get(r["cell_id"], len(order)))
    write_atomically(out_dir / RESULTS, "".join(json.dumps(r) + "\n" for r in merged))
    for path in files:
        if path.name != RESULTS:
            path.unlink()
    return [r for r in merged if r["cell_id"] in order]


def write_table(path, rows, columns):
    """A CSV file of `columns` of `rows` (lists as space-separated values), written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for r in rows:
        w.writerow([" ".join(map(str, r[c])) if isinstance(r.get(c), list) else r.get(c, "") for c in columns])
    write_atomically(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# Tables and labels


def _fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def exit_name(row):
    """'untrained', or the trained exit's directory name (however its path was spelled); 'none' for lookup cells."""
    return row["exit"] if row["exit"] in ("untrained", "none") else Path(row["exit"]).name


def exit_label(row):
    """The draft source of a row: `exit_L3 L3`, `lookup`, `exit_L3 L3 + lookup`, `recycled`, `auto: exit_L3 L3`."""
    return SOURCES[row.get("draft") or "exit"].label.format(exit=f"{exit_name(row)} L{row['exit_layer']}")


def prompt_sets(rows):
    """The rows' prompt sets in order of appearance (one None for rows made before prompt sets existed)."""
    return list(dict.fromkeys(r.get("prompt_set") for r in rows))


def table(head, body):
    """Markdown table lines: the head, the rule, one line per row of cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(map(str, cells)) + " |" for cells in body]


def describe_machine(m, dtype):
    """'AMD EPYC [avx2 avx512f], 2 threads, torch 2.13.0+cpu, bfloat16' (the GPU's name instead when there is one),
    from a results row or a checkpoint's `machine`."""
    threads = m.get("threads", "?")
    threads = f"{threads} thread{'' if threads == 1 else 's'}"
    where = m.get("gpu") or f"{m.get('cpu', '?')} [{m.get('cpu_flags', '')}], {threads}"
    return f"{where}, torch {m.get('torch', '?')}, {dtype}"


def sizes(rows):
    """'16 prompts x 128 new tokens' for each distinct size of the rows' cells."""
    return ", ".join(dict.fromkeys(f"{r['prompts']} prompts x {r['max_new_tokens']} new tokens" for r in rows))


def gamma_label(row):
    """γ, the tree (width x nodes), the adaptive stop and the lookup's length when the cell has them: `4`,
    `2, tree 4x8, stop 0.3`, `1, lookup 4`."""
    stop, width = row.get("draft_stop") or 0, row.get("tree_width") or 1
    tree = f", tree {width}x{row.get('tree_nodes') or width * row['gamma']}" if width > 1 else ""
    kind = SOURCES[row.get("draft") or "exit"]
    lookup = f", lookup {row.get('lookup_tokens') or row['gamma']}" if kind.exit and kind.lookup else ""
    return f"{row['gamma']}{tree}{lookup}" + (f", stop {stop:g}" if stop else "")


def policy_name(policy):
    t, p, k = policy
    return "greedy" if t == 0 else f"T={t:g}, top_p={p:g}" + (f", top_k={k}" if k else "")


def greedy_label(r):
    """'8/8' for a greedy cell (with the mean first-difference position when some prompts part); '-' otherwise."""
    if r.get("greedy_match") is None:
        return _fmt(r.get("matches_baseline"))
    diff = r.get("first_diff_mean")
    return r["greedy_match"] + (f" (at {diff:.0f})" if diff is not None else "")


def markdown_table(rows):
    """The summary as a Markdown table."""
    head = ["draft", "γ", "policy", "avg drafts", "accepted / drafted", "α", "avg accepted", "overlap", "tok/s",
            "baseline tok/s", "speedup", "generate tok/s (ours beside it)", "speedup vs generate", "c", "predicted",
            "greedy = baseline (first diff)"]
    body = []
    for r in rows:
        peer = (f"{_fmt(r.get('generate_tokens_per_s'), 1)} ({_fmt(r.get('peer_ar_tokens_per_s'), 1)})"
                if r.get("generate_tokens_per_s") else "")
        body.append([exit_label(r), gamma_label(r), policy_name((r["temperature"], r["top_p"], r["top_k"])),
                 _fmt(r.get("avg_draft_len"), 2), f"{r['accepted']} / {r['drafted']}", _fmt(r["alpha"], 2),
                 _fmt(r["avg_accepted"], 2), _fmt(r["avg_overlap"]), _fmt(r["tokens_per_s"], 1),
                 _fmt(r["baseline_tokens_per_s"], 1), _fmt(r["speedup"], 2), peer,
                 _fmt(r.get("speedup_vs_generate"), 2),
                 _fmt(r["c"] if SOURCES[r.get("draft") or "exit"].exit else r.get("c_lookup"), 2),
                     _fmt(r["predicted_speedup"], 2), greedy_label(r)])
    return "\n".join(table(head, body)) + "\n"


# The headline rule, stated once: every "best" figure (evaluate.py --best_line, make speedup's and make report's last
# line, REPORT.md's opening table, the README's table) is chosen by it.
HEADLINE_RULE = ("a cell's speedup is its tokens/s over our autoregressive loop's on the same prompts, policy and "
                 "seeds; the best is the largest among the lossless cells: every sampling cell (exact by "
                 "construction, checked by the chi-square tests) and a greedy cell only when every prompt's tokens "
                 "equal the baseline's; intervals are 95% bootstrap intervals over the prompts, each resample pairing "
                 "a prompt's speculative run with its own baseline run")


def lossless(r):
    """Whether a row counts for the headline (HEADLINE_RULE): timed, and sampled or identical on every prompt."""
    return r.get("speedup") is not None and (r["temperature"] > 0 or r.get("matches_baseline") is True)


def interval(row, what="speedup", draws=2000, seed=0):
    """The 95% bootstrap interval (lo, hi) of a row's `what` ("speedup", or "tokens_per_call": new tokens per verify
    call, the bonus token included) over its prompts: `draws` resamples of the prompts with replacement, each prompt
    keeping its own baseline run (per_prompt: [new tokens, seconds, verify calls, baseline's tokens, its seconds]).
    None with fewer than two prompts or no per-prompt record (rows from before 2026-12-07). Computed once per
    records and figure: a report asks for the same row's interval from several tables and charts."""
    each = row.get("per_prompt") or []
    if len(each) < 2:
        return None
    return _bootstrap(tuple(map(tuple, each)), what, draws, seed)


@functools.lru_cache(maxsize=4096)
def _bootstrap(each, what, draws, seed):
    rng, n, values = random.Random(seed), len(each), []
    for _ in range(draws):
        pick = [each[rng.randrange(n)] for _ in range(n)]
        new, sec, calls, base_new, base_sec = (sum(x[i] for x in pick) for i in range(5))
        if what == "speedup":
            values.append((new / sec) / (base_new / base_sec) if sec and base_new and base_sec else 0.0)
        else:
            values.append(new / calls if calls else 0.0)
    values.sort()
    return values[int(0.025 * (draws - 1))], values[int(0.975 * (draws - 1))]


def with_interval(row, what="speedup", digits=2):
    """'1.22 [1.10, 1.35]': a row's figure and its 95% interval (the figure alone when there is none)."""
    value = row.get(what if what != "tokens_per_call" else "tokens_per_cycle")
    if value is None:
        return "-"
    ci = interval(row, what)
    return f"{value:.{digits}f}" + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def best_line(rows):
    """One line naming the cell with the best measured speedup that is lossless (HEADLINE_RULE), with its 95%
    interval over the prompts when the row has per-prompt records:

        best lossless speedup: X.XXx (<exit>, L <l>, gamma <g>, <policy>, <n> prompts x <m> tokens)[; 95% ...]
    """
    ok = [r for r in rows if lossless(r)]
    if not ok:
        return "best lossless speedup: none (no sampling cell, and no greedy cell whose tokens match the baseline)"
    r = max(ok, key=lambda r: r["speedup"])
    policy = policy_name((r["temperature"], r["top_p"], r["top_k"]))
    if r.get("draft_stop"):
        policy += f", draft_stop {r['draft_stop']:g}"
    width = r.get("tree_width") or 1
    kind = SOURCES[r.get("draft") or "exit"]
    nodes = f", nodes {r.get('tree_nodes') or width * r['gamma']}" if kind.nodes else " branches"
    tree = f", width {width}{nodes}" if width > 1 else ", width 1 (chain)"
    if not kind.exit:
        source = (f"{kind.label}" + (f", n-gram {r.get('ngram', 3)}" if kind.lookup else "") + f", gamma {r['gamma']}"
                  + (tree if width > 1 else ", chain"))
    else:
        source = f"{exit_name(r)}, L {r['exit_layer']}, gamma {r['gamma']}{tree}"
        if kind.lookup:
            source = f"{r['draft']}: {source}, lookup {r.get('lookup_tokens') or r['gamma']}"
    where = f", {r['prompt_set']}" if r.get("prompt_set") else ""
    ci = interval(r)
    ci = f"; 95% interval {ci[0]:.2f}-{ci[1]:.2f}x over the prompts" if ci else ""
    peer = (f"; {r['speedup_vs_generate']:.2f}x over transformers' generate" if r.get("speedup_vs_generate")
            else "")
    return (f"best lossless speedup: {r['speedup']:.2f}x ({source}, {policy}, {r['prompts']} prompts x "
            f"{r['max_new_tokens']} tokens{where}){ci}{peer}")


# ----------------------------------------------------------------------------------------------------------------
# One generation's stats (generate.speculative_generate's), from its cycles


def cycle_stats(per_cycle: list, per_cycle_drafted: list, overlap_sum: float, gamma: int,
                per_cycle_judged: Optional[list] = None, overlap_rows: Optional[int] = None) -> dict:
    """The loop's stats from its cycles' accepted and drafted counts (see speculative_generate). `per_cycle_judged`:
    the levels each cycle judged (accepted, plus one for a rejection; by default from the drafted counts, as for a
    chain); `overlap_rows`: the rows overlap_sum is over (by default the drafted tokens)."""
    cycles, drafted = len(per_cycle), sum(per_cycle_drafted)
    if per_cycle_judged is None:
        per_cycle_judged = [k + (k < d) for k, d in zip(per_cycle, per_cycle_drafted)]
    accepted, rejected = judged_drafts(per_cycle, per_cycle_judged)
    rows = drafted if overlap_rows is None else overlap_rows
    avg_overlap = overlap_sum / rows if rows else float("nan")
    hist, len_hist = [0] * (gamma + 1), [0] * (max([gamma] + per_cycle_drafted) + 1)
    for k, d in zip(per_cycle, per_cycle_drafted):
        hist[k] += 1
        len_hist[d] += 1
    return {
        "target_calls": cycles, "drafted": drafted, "accepted": accepted, "rejected": rejected,
        "avg_accepted": accepted / cycles if cycles else 0.0,
        "acceptance_rate": accepted / drafted if drafted else float("nan"),
        "avg_overlap": avg_overlap, "avg_tv": 1.0 - avg_overlap, "overlap_sum": overlap_sum, "overlap_rows": rows,
        "accept_hist": hist, "draft_len_hist": len_hist, "avg_draft_len": drafted / cycles if cycles else 0.0,
        "per_cycle": per_cycle, "per_cycle_drafted": per_cycle_drafted,
        **depth_counts(per_cycle, per_cycle_judged, gamma),
    }


def depth_counts(per_cycle: list, per_cycle_judged: list, gamma: int) -> dict:
    """Per depth d = 1..gamma: `judged_by_depth` (cycles that judged a d-th draft), `accepted_by_depth` (cycles that
    accepted one) and `accept_by_depth`, their ratio (None where none was judged): the acceptance at each depth given
    the depths before it."""
    judged = [sum(j >= d for j in per_cycle_judged) for d in range(1, gamma + 1)]
    accepted = [sum(k >= d for k in per_cycle) for d in range(1, gamma + 1)]
    return {"judged_by_depth": judged, "accepted_by_depth": accepted,
            "accept_by_depth": [a / j if j else None for a, j in zip(accepted, judged)]}


def judged_drafts(per_cycle: list, per_cycle_drafted: list) -> tuple:
    """(accepted, rejected) drafts of one speculative_generate call from its per-cycle accepted and drafted counts
    (stats per_cycle, per_cycle_drafted): a cycle that drafted d tokens and accepted k < d rejected one; drafts
    after a rejection are never judged. (The drafted counts come from the loop: with draft_stop they are not a
    function of gamma.)"""
    if len(per_cycle) != len(per_cycle_drafted) or any(not 0 <= k <= d for k, d in zip(per_cycle, per_cycle_drafted)):
        raise ValueError("per_cycle and per_cycle_drafted must be equally long, with 0 <= accepted <= drafted.")
    return sum(per_cycle), sum(k < d for k, d in zip(per_cycle, per_cycle_drafted))


# ----------------------------------------------------------------------------------------------------------------
# The cost model


def tokens_per_cycle(a, d):
    """Expected tokens of a cycle that drafts d tokens, each accepted with probability a given the ones before it:
    the accepted drafts plus the target's own token, (1 - a^(d+1)) / (1 - a)."""
    return d + 1 if a >= 1 else (1 - a ** (d + 1)) / (1 - a)


def predicted_speedup(a, gamma, c, draft_len_hist=None, v=1.0):
    """The standard estimate (Leviathan et al., 2023): a cycle yields (1 - a^(g+1)) / (1 - a) tokens, on average,
    when each draft is accepted with probability a given the ones before it, and costs g c + v autoregressive steps
    (g draft steps of cost c, and one verification of cost v, 1 by default).

    With `draft_len_hist` (cycles that drafted 0, 1, .. tokens: the realised lengths, which --draft_stop and the
    last cycles of a generation make shorter than gamma), the tokens per cycle are averaged over those lengths and
    the cost is d c + v with d their mean."""
    if a is None or not math.isfinite(a):
        return None
    lengths = {gamma: 1} if draft_len_hist is None else {d: n for d, n in enumerate(draft_len_hist) if n}
    cycles = sum(lengths.values())
    if not cycles:
        return None
    tokens = sum(n * tokens_per_cycle(a, d) for d, n in lengths.items()) / cycles
    mean_d = sum(n * d for d, n in lengths.items()) / cycles
    return tokens / (mean_d * c + v)

def predicted_tree_speedup(accept_by_depth, draft_cost, v=1.0):
    """A tree's estimate from its measured acceptance at each depth (a_d: a d-th token accepted given d - 1 were):
    a cycle yields 1 + a_1 + a_1 a_2 + ... tokens and costs draft_cost (its draft steps, each at its rows' measured
    cost, in autoregressive steps) + v (the verification of its nodes)."""
    if not accept_by_depth or accept_by_depth[0] is None:
        return None
    tokens, reach = 1.0, 1.0
    for a in accept_by_depth:
        reach *= a or 0.0
        tokens += reach
    return tokens / (draft_cost + v)


BREAK_EVEN_GAMMAS = (1, 2, 4)


def break_even_c(a, gamma, v=1.0):
    """The draft cost c (draft step / full step) at which the predicted speedup of a cycle of gamma drafts, each
    accepted with probability a, is exactly 1: tokens_per_cycle(a, gamma) = gamma c + v. Below it, drafting pays."""
    return (tokens_per_cycle(a, gamma) - v) / gamma


def predicted_mixed_speedup(tokens, cycles, v_of, c, draft_rows_cost=0.0, lookup_steps=0.0):
    """The cost model for cycles of several kinds (prompt lookup, the exit's chains and trees, as exit+lookup mixes
    them): the measured tokens over the modelled cost in autoregressive steps. `cycles`: (kind, drafted) of every
    cycle; a lookup cycle costs v(d + 1) (one full pass over last + its d tokens), an exit chain d c + v(d + 1),
    a tree v(nodes + 1) plus its draft steps (`draft_rows_cost`, in steps); `lookup_steps`: the lookup's own time in
    steps; `v_of(k)`: a k-token full step over a one-token one."""
    cost = draft_rows_cost + lookup_steps
    for kind, d in cycles:
        cost += v_of(d + 1) + (d * c if kind == "exit" else 0.0)
    return tokens / cost if cost else None
