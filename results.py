"""The sweep's results: files, tables, labels and the cost model, shared by the sweep (evaluate.py) and its plots.

    results.jsonl      one JSON line per cell, appended in one write; per-process results.rank*.jsonl merged at the end
    summary.csv/.md    the same as tables
    layer_sweep.jsonl  the teacher-forced metrics of every exit at every layer

The cost model (Leviathan et al., 2023): a cycle of d drafts, each accepted with probability a given the ones before
it, yields (1 - a^(d+1)) / (1 - a) tokens and costs d c + v autoregressive steps (c: draft step / full step; v: the
verification of d drafts / a one-token full step).
"""
import csv
import io
import json
import math
import os
from pathlib import Path

from checkpoints import write_atomically


RESULTS, SUMMARY_CSV, SUMMARY_MD = "results.jsonl", "summary.csv", "summary.md"
LAYER_SWEEP = "layer_sweep"
# Fields that depend on the machine and the moment; everything else in a row is a pure function of the cell.
TIMING_FIELDS = ("seconds", "tokens_per_s", "baseline_seconds", "baseline_tokens_per_s", "speedup",
                 "draft_step_ms", "full_step_ms", "c", "v", "predicted_speedup",
                 "cpu", "cpu_flags", "threads", "torch", "gpu", "engine")  # the machine, and the forms it measured
SUMMARY_COLUMNS = ("exit", "exit_layer", "gamma", "temperature", "top_p", "top_k", "draft_stop", "tree_width",
                   "tree_nodes", "tokens_per_cycle", "accept_by_depth", "prompts",
                   "new_tokens", "target_calls", "drafted", "accepted", "avg_accepted", "acceptance_rate", "alpha",
                   "avg_overlap", "avg_tv", "accept_hist", "avg_draft_len", "draft_len_hist", "matches_baseline",
                   "greedy_match", "first_diff_mean", "seconds", "tokens_per_s", "baseline_new_tokens",
                   "baseline_seconds", "baseline_tokens_per_s", "speedup", "draft_step_ms", "full_step_ms", "c",
                   "v", "predicted_speedup", "cell_id")


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
    """'untrained', or the trained exit's directory name (however its path was spelled)."""
    return "untrained" if row["exit"] == "untrained" else Path(row["exit"]).name


def exit_label(row):
    return f"{exit_name(row)} L{row['exit_layer']}"


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
    """γ, the tree (width x nodes) and the adaptive stop when the cell has them: `4`, `2, tree 4x8, stop 0.3`."""
    stop, width = row.get("draft_stop") or 0, row.get("tree_width") or 1
    tree = f", tree {width}x{row.get('tree_nodes') or width * row['gamma']}" if width > 1 else ""
    return f"{row['gamma']}{tree}" + (f", stop {stop:g}" if stop else "")


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
    head = ["exit", "γ", "policy", "avg drafts", "accepted / drafted", "α", "avg accepted", "overlap", "tok/s",
            "baseline tok/s", "speedup", "c", "predicted", "greedy = baseline (first diff)"]
    body = []
    for r in rows:
        body.append([exit_label(r), gamma_label(r), policy_name((r["temperature"], r["top_p"], r["top_k"])),
                 _fmt(r.get("avg_draft_len"), 2), f"{r['accepted']} / {r['drafted']}", _fmt(r["alpha"], 2),
                 _fmt(r["avg_accepted"], 2), _fmt(r["avg_overlap"]), _fmt(r["tokens_per_s"], 1),
                 _fmt(r["baseline_tokens_per_s"], 1), _fmt(r["speedup"], 2), _fmt(r["c"], 2),
                     _fmt(r["predicted_speedup"], 2), greedy_label(r)])
    return "\n".join(table(head, body)) + "\n"


def best_line(rows):
    """One line naming the cell with the best measured speedup that is lossless: every sampling cell (exact by
    construction; the chi-square tests check it), and a greedy cell only if its tokens equal the autoregressive
    baseline's on every prompt (matches_baseline).

        best lossless speedup: X.XXx (<exit>, L <l>, gamma <g>, <policy>, <n> prompts x <m> tokens)
    """
    ok = [r for r in rows if r.get("speedup") is not None
          and (r["temperature"] > 0 or r.get("matches_baseline") is True)]
    if not ok:
        return "best lossless speedup: none (no sampling cell, and no greedy cell whose tokens match the baseline)"
    r = max(ok, key=lambda r: r["speedup"])
    name = exit_name(r)
    policy = policy_name((r["temperature"], r["top_p"], r["top_k"]))
    if r.get("draft_stop"):
        policy += f", draft_stop {r['draft_stop']:g}"
    width = r.get("tree_width") or 1
    tree = f", width {width}, nodes {r.get('tree_nodes') or width * r['gamma']}" if width > 1 else ", width 1 (chain)"
    return (f"best lossless speedup: {r['speedup']:.2f}x ({name}, L {r['exit_layer']}, gamma {r['gamma']}{tree}, "
            f"{policy}, {r['prompts']} prompts x {r['max_new_tokens']} tokens)")


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
