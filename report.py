"""The report of one report directory: REPORT.md and its two plots, from what train.py and evaluate.py left there.

    OUT/exit_L<l>/   trained exits (exit_config.json, log.jsonl, train_curve.png), from train.py
    OUT/eval/        the sweep (results.jsonl, layer_sweep.jsonl, summary.md, its plots), from evaluate.py: a layer
                     scan (untrained and trained exits, one policy, gamma 4) and a gamma grid of the trained exits
    OUT/eval/sources/  every draft source (the shallowest trained exit's chains, lookup, exit+lookup, recycled, auto)
                     per prompt set (ShareGPT and its task groups, or any --dataset), from evaluate.py

    python report.py OUT [--command "make report ..."]     # writes OUT/REPORT.md, OUT/*_report.png

REPORT.md: the machine, commands and sizes; where it pays (per prompt set and policy, the best cell of each draft
source with 95% intervals over the prompts, by results.HEADLINE_RULE); the training of each exit; acceptance against the exit layer; speed
against gamma; where drafting pays; the cost model per cell. A missing piece (no teacher-forced sweep, no untrained
exits, ...) is one line saying so. Paths in it are relative to OUT, so it can be copied elsewhere with its PNGs. The
last line of REPORT.md and of stdout is the best lossless speedup (results.best_line, as evaluate.py --best_line).
"""
import datetime
import json
import re
import sys
from pathlib import Path

from checkpoints import CONFIG_FILE, LOG_FILE, write_atomically
from cli import Parser, UsageError, run_command
from plots import CURVE_FILE, MARKERS, _by_layer, _figure, _save, plot_where_it_pays
from results import (HEADLINE_RULE, LAYER_SWEEP, RESULTS, SUMMARY_MD, best_line, describe_machine, exit_label, exit_name,
                     gamma_label, interval, lossless, policy_name, read_results, read_rows, sizes, table,
                     with_interval)

REPORT, EVAL, SOURCES = "REPORT.md", "eval", "sources"  # OUT/eval/sources/: every draft source per prompt set
LAYER_PLOT, GAMMA_PLOT = "accepted_vs_layer_report.png", "speed_vs_gamma_report.png"
SOURCES_PLOT, SOURCES_GAMMA_PLOT = "sources_per_task_report.png", "sources_vs_gamma_report.png"
WHERE_PLOT = "where_it_pays_report.png"

# ----------------------------------------------------------------------------------------------------------------
# Reading the directory


def load_exits(out):
    """The trained exits in OUT/exit_L*/, by layer: (directory name, exit_config.json, log.jsonl records)."""
    exits = []
    for d in out.glob("exit_L*"):
        if (d / CONFIG_FILE).is_file():
            exits.append((d.name, json.loads((d / CONFIG_FILE).read_text()), read_rows(d / LOG_FILE, key=None)))
    return sorted(exits, key=lambda e: (e[1].get("exit_layer", 0), e[0]))


def sweep_commands(eval_dir):
    """The evaluate.py command lines recorded in summary.md (the last run of the sweep's; earlier ones are
    overwritten by it)."""
    path = eval_dir / SUMMARY_MD
    return re.findall(r"^`(python evaluate\.py[^`]*)`$", path.read_text(), re.M) if path.is_file() else []


def result_dirs(out):
    """OUT's sweep directories that hold results: OUT/eval (the exits' grid) and OUT/eval/sources (every source)."""
    return [d for d in (Path(out) / EVAL, Path(out) / EVAL / SOURCES) if (d / RESULTS).is_file()]


def flag_value(commands, flag):
    """The last value of `flag` in any of the command lines (None if none has it)."""
    found = [m for c in commands for m in re.findall(rf"{flag}[ =](\S+)", c)]
    return found[-1] if found else None


# ----------------------------------------------------------------------------------------------------------------
# Rows


def same(a, b):
    return abs(a - b) < 1e-9


def is_policy(row, temperature, top_p, top_k):
    return same(row["temperature"], temperature) and same(row["top_p"], top_p) and row["top_k"] == top_k


def chains(rows):
    """The cells of plain chains of drafts: no tree, no adaptive draft stop; each cell once. A cell measured twice
    (in the layer scan and again in the gamma grid) keeps its paired-baseline row, else the later one. Exits are
    told apart by their directory's name, as everywhere in the report."""
    kept = {}
    for r in rows:
        if (r.get("tree_width") or 1) == 1 and not r.get("draft_stop") and (r.get("draft") or "exit") == "exit":
            key = (exit_name(r), r["exit_layer"], r["gamma"], r["temperature"], r["top_p"], r["top_k"])
            if key not in kept or bool(r.get("paired_baseline")) >= bool(kept[key].get("paired_baseline")):
                kept[key] = r
    return list(kept.values())


def num(x, digits=3):
    return "-" if x is None else f"{x:.{digits}f}"


def joined(rows, key, digits=3):
    """The values of `key` in rows (several exits at one layer: joined by ' / '); '-' for none."""
    return " / ".join(num(r.get(key), digits) for r in rows) or "-"


def overlap_key(temperature):
    """The teacher-forced overlap column at a temperature: overlap_t1, overlap_t07 (train.py's names), overlap_t<T>."""
    return {1.0: "overlap_t1", 0.7: "overlap_t07"}.get(temperature, f"overlap_t{temperature:g}")





# ----------------------------------------------------------------------------------------------------------------
# Sections: each returns its Markdown lines


def header(out, rows, tf_rows, exits, commands):
    model = next((r["model"] for r in rows), next((e[1].get("base_model") for e in exits), "?"))
    lines = [f"# Self-speculation report: {Path(str(model)).name}", ""]
    sweep = {}
    for r in rows:
        key = describe_machine(r, r.get("dtype", "?"))
        sweep[key] = sweep.get(key, 0) + 1
    for m, n in sweep.items():
        lines.append(f"- machine (sweep{f', {n} of {len(rows)} cells' if len(sweep) > 1 else ''}): {m}")
    if not rows:
        lines.append(f"- machine (sweep): unknown, no cells in {EVAL}/{RESULTS}")
    for m in dict.fromkeys(f"{describe_machine(c.get('machine', {}), c.get('dtype', '?'))} (the exit in float32), "
                           f"{c.get('world_size', 1)} process(es)" for _, c, _ in exits):
        lines.append(f"- machine (training): {m}")
    for c in commands["given"]:
        lines.append(f"- command: `{c}`")
    if not commands["given"]:
        lines.append("- command: not recorded (report.py --command)")
    for c in commands["sweep"]:
        lines.append(f"- last sweep command (from {EVAL}/{SUMMARY_MD}): `{c}`")
    if rows:
        lines.append(f"- n: {sizes(rows)} per cell ({len(rows)} cells, seed {rows[0].get('seed', '?')}, "
                     f"dataset {rows[0].get('dataset', '?')})")
    if tf_rows:
        every = commands["given"] + commands["sweep"]
        found = [int(v) for c in every for v in re.findall(r"--tf_blocks[ =](\d+)", c)]
        blocks, seq_len = max(found, default=0) or None, flag_value(every, "--tf_seq_len")  # 0: a run that skipped it
        shape = f" ({blocks} blocks{f' x {seq_len} tokens' if seq_len else ''})" if blocks else ""
        lines.append(f"- teacher-forced: {tf_rows[0]['tokens']} held-out tokens{shape}")
    lines += greedy_bits_line(rows)
    when = datetime.date.today().isoformat()
    results = out / EVAL / RESULTS
    if results.is_file():
        stamp = datetime.datetime.fromtimestamp(results.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
        when += f" (report); {EVAL}/{RESULTS} last written {stamp}"
    return lines + [f"- date: {when}", ""]


def greedy_bits_line(rows):
    """How many greedy cells decoded every prompt as the baseline did, where the dtype rounds (not float32): the row-
    invariant step makes them equal on CPUs; on a GPU, one-token steps and multi-row verifies may take kernels that
    round apart (not yet measured), and the best line leaves out any greedy cell where a prompt parted."""
    greedy = [r for r in rows if r.get("greedy_match") and r.get("dtype") not in (None, "float32")]
    if not greedy:
        return []
    whole = sum(a == b for a, b in (r["greedy_match"].split("/") for r in greedy))
    where = sorted({"GPU" if r.get("gpu") else "CPU" for r in greedy})
    return [f"- greedy in {greedy[0]['dtype']} ({'/'.join(where)}): {whole} of {len(greedy)} greedy cells decoded "
            f"every prompt as the baseline did; a cell where one parted is left out of the best line"
            + ("; on a GPU a one-token step and a multi-row verify may round apart (docs/design.md)"
               if "GPU" in where else "")]


def training_section(out, exits):
    lines = ["## Training", ""]
    if not exits:
        return lines + ["No trained exits (exit_L*/exit_config.json) in this directory.", ""]
    body = []
    for d, cfg, log in exits:
        m = cfg.get("metrics", {})
        step0 = next((r for r in log if r.get("step") == 0 and "val/top1" in r), {})
        before = next((r for r in log if "untrained/top1" in r), {})
        curve = f"[{CURVE_FILE}]({d}/{CURVE_FILE})" if (out / d / CURVE_FILE).is_file() else "-"
        body.append([d, cfg.get("exit_layer", "-"), cfg.get("step", "-"), num(m.get("top1")), num(m.get("kl")),
                     num(m.get("overlap_t1")), num(m.get("overlap_t07")), num(before.get("untrained/top1")),
                     num(step0.get("val/top1")), ", ".join(cfg.get("trained", [])) or "-", curve])
    head = ["exit", "L", "steps", "val top-1", "KL", "overlap T=1", "overlap T=0.7", "top-1 untrained (before the "
            "head fit)", "top-1 at step 0", "trained", "curve"]
    lines += table(head, body)
    lines += ["", "Validation on held-out blocks against the full model (exit_config.json's last metrics); "
              "'untrained' is the log's step-0 `untrained/` record, written only when a head fit (--head_init lstsq) "
              "precedes step 0; without one, step 0 is the untrained exit.", ""]
    return lines


def layer_section(rows, tf_rows, out, args, caption):
    policy = (args.layer_temperature, args.top_p, args.top_k)
    title = f"{policy_name(policy)}, γ={args.layer_gamma}"
    lines = [f"## Against the exit layer ({title})", ""]
    sel = [r for r in chains(rows) if is_policy(r, *policy) and r["gamma"] == args.layer_gamma]
    untrained = [r for r in sel if r["exit"] == "untrained"]
    trained = [r for r in sel if r["exit"] != "untrained"]
    tf_key = overlap_key(args.layer_temperature)
    tf_untrained = [r for r in tf_rows if r["exit"] == "untrained"]
    tf_trained = [r for r in tf_rows if r["exit"] != "untrained"]
    if not sel:
        lines.append(f"No sweep cells at {title}: no generation columns.")
    elif not untrained:
        lines.append(f"No untrained exits among the cells at {title}: trained exits only.")
    elif not trained:
        lines.append(f"No trained exits among the cells at {title}: untrained exits only.")
    if not tf_rows:
        lines.append(f"No teacher-forced layer sweep ({EVAL}/{LAYER_SWEEP}.jsonl; evaluate.py --tf_blocks 0 skips "
                     "it): no teacher-forced columns.")
    if not sel and not tf_rows:
        return lines + [""]
    tv = any(r.get("avg_tv") is not None for r in sel)
    cols = []  # (heading, rows of the kind, key)
    for kind, some in (("untrained", untrained), ("trained", trained)):
        if some:
            cols += [(f"{kind} accepted", some, "avg_accepted"), (f"{kind} overlap", some, "avg_overlap")]
            cols += [(f"{kind} TV", some, "avg_tv")] if tv else []
    for kind, some in (("untrained", tf_untrained), ("trained", tf_trained)):
        if some:
            cols += [(f"TF top-1 {kind}", some, "top1"),
                     (f"TF overlap T={args.layer_temperature:g} {kind}", some, tf_key)]
    layers = sorted({r["exit_layer"] for r in sel} or {r["exit_layer"] for r in tf_rows})  # the plot has every TF layer
    body = [[L] + [joined([r for r in some if r["exit_layer"] == L], key) for _, some, key in cols] for L in layers]
    lines += [""] + table(["L"] + [c[0] for c in cols], body)
    names = ", ".join(dict.fromkeys(f"{exit_name(r)} (L{r['exit_layer']})" for r in trained + tf_trained))
    lines += ["", "accepted: accepted drafts per target call (tokens); overlap: Σ min(p, q) over drafted positions "
              "(the expected acceptance of one draft); TV = 1 − overlap; TF: teacher-forced on held-out text "
              f"(top-1 agreement with the full model, overlap at T={args.layer_temperature:g}; the plot shows it at "
              "every layer the sweep measured)."
              + (f" Trained: {names}." if names else ""), ""]
    plot_layers(sel, tf_rows, tf_key, out / LAYER_PLOT, f"{title}; {caption}")
    return lines + [f"![accepted drafts against the exit layer]({LAYER_PLOT})", "",
                    f"*{LAYER_PLOT}: {title}; {caption}.*", ""]


def grid_rows(rows, args):
    """The gamma grid: trained exits' chains at --temperatures, --top_p, --top_k, for each exit measured at more
    than one gamma (ordered by layer, temperature, gamma); and the names of the exits left out (one gamma only)."""
    sel = [r for r in chains(rows) if r["exit"] != "untrained"
           and any(is_policy(r, t, args.top_p, args.top_k) for t in args.temperatures)]
    gammas = {}
    for r in sel:
        gammas.setdefault(exit_name(r), set()).add(r["gamma"])
    kept = sorted((r for r in sel if len(gammas[exit_name(r)]) > 1),
                  key=lambda r: (r["exit_layer"], exit_name(r), r["temperature"], r["gamma"]))
    return kept, [e for e, g in gammas.items() if len(g) == 1]


def best_gammas(grid):
    """{(exit name, temperature): the row with the best measured speedup}."""
    best = {}
    for r in grid:
        key = (exit_name(r), r["temperature"])
        if r.get("speedup") is not None and (key not in best or r["speedup"] > best[key]["speedup"]):
            best[key] = r
    return best


def gamma_section(grid, left_out, out, args, caption):
    lines = [f"## Against γ (trained exits, top_p={args.top_p:g}{f', top_k={args.top_k}' if args.top_k else ''})",
             ""]
    if left_out:
        lines.append(f"Measured at one γ only, so left out here: {', '.join(left_out)}.")
    if not grid:
        return lines + ["No trained exit was measured at more than one γ at these policies: no gamma grid.", ""]
    for t in args.temperatures:
        if not any(same(r["temperature"], t) for r in grid):
            lines.append(f"No gamma-grid cells at T={t:g}.")
    best = best_gammas(grid)
    body = [[exit_name(r), r["exit_layer"], f"{r['temperature']:g}", r["gamma"], num(r["tokens_per_s"], 1),
             num(r["baseline_tokens_per_s"], 1),
             f"**{num(r['speedup'], 2)}**" if best.get((exit_name(r), r["temperature"])) is r else num(r["speedup"], 2),
             num(r["avg_accepted"], 2)] for r in grid]
    lines += [""] + table(["exit", "L", "T", "γ", "tok/s", "baseline tok/s", "speedup", "avg accepted"], body)
    paired = all(r.get("paired_baseline") for r in grid)
    lines += ["", "Bold: the best γ of each exit and temperature. Baselines: "
              + ("each cell's own autoregressive run, prompt by prompt in turns with it (--paired_baseline)."
                 if paired else "autoregressive runs timed once per exit and policy (or per cell where paired)."), ""]
    lines += ["Best γ:", ""] + table(["exit", "L", "T", "best γ", "speedup", "avg accepted"], [
        [exit_name(r), r["exit_layer"], f"{r['temperature']:g}", r["gamma"], num(r["speedup"], 2),
         num(r["avg_accepted"], 2)] for r in best.values()])
    plot_gammas(grid, args, out / GAMMA_PLOT, caption)
    return lines + ["", f"![speedup against γ]({GAMMA_PLOT})", "", f"*{GAMMA_PLOT}: {caption}.*", ""]


def where_section(rows, out, model_name):
    lines = ["## Where it pays", ""]
    if rows:  # drawn here from every cell of both runs (evaluate.py's own map has the cells of its last run only)
        plot_where_it_pays(rows, out / WHERE_PLOT, model_name)
        lines += [f"![where it pays]({WHERE_PLOT})", "",
                  f"*{WHERE_PLOT}: every cell in the (α, c) plane, trained exits filled, untrained hollow; below a γ's "
                  "break-even curve the cost model predicts a speedup over autoregressive decoding.*", ""]
    else:
        lines += ["No cells: no map.", ""]
    stops = [r for r in rows if r.get("draft_stop") and r.get("speedup") is not None]
    if not stops:
        return lines + ["No cells with a draft stop (evaluate.py --draft_stop): no best stop.", ""]
    best = {}
    for r in stops:
        if exit_name(r) not in best or r["speedup"] > best[exit_name(r)]["speedup"]:
            best[exit_name(r)] = r
    key = lambda r: (exit_name(r), r["exit_layer"], r["gamma"], r["temperature"], r["top_p"], r["top_k"],
                     r.get("tree_width") or 1, r.get("tree_nodes") or 0)
    without = {key(r): r for r in rows if not r.get("draft_stop")}
    body = [[exit_name(r), r["exit_layer"], r["gamma"], policy_name((r["temperature"], r["top_p"], r["top_k"])),
             f"{r['draft_stop']:g}", num(r["speedup"], 2), num(without.get(key(r), {}).get("speedup"), 2)]
            for r in sorted(best.values(), key=lambda r: r["exit_layer"])]
    return lines + ["Best draft stop per exit:", ""] + table(
        ["exit", "L", "γ (cap)", "policy", "best draft stop", "speedup", "speedup without a stop"], body) + [""]


def prompt_set_of(row):
    """A row's prompt set: its own name, or for a one-set sweep's rows (prompt_set "") the dataset's."""
    return row.get("prompt_set") or row.get("dataset")


def parts(a, b):
    """Whether row a's 95% interval lies wholly above row b's (a row without one cannot be told apart)."""
    ia, ib = interval(a), interval(b)
    return ia is not None and ib is not None and ia[0] > ib[1]


def best_per_source(rows):
    """{(prompt set, policy): {source: its best lossless row}}, in the order the rows name them (a one-set sweep's
    rows count under its dataset's name)."""
    groups = {}
    for r in (r for r in rows if lossless(r)):
        best = groups.setdefault((prompt_set_of(r), (r["temperature"], r["top_p"], r["top_k"])), {})
        d = r.get("draft") or "exit"
        if d not in best or r["speedup"] > best[d]["speedup"]:
            best[d] = r
    sets = list(dict.fromkeys(k[0] for k in groups))
    policies = list(dict.fromkeys(k[1] for k in groups))
    return {(n, p): groups[(n, p)] for n in sets for p in policies if (n, p) in groups}


def headline_section(rows):
    """REPORT.md's opening table: per prompt set and policy, the best lossless cell of each draft source with its
    speedup and mean accepted tokens per verify call (the bonus token included, as the field counts them), each with
    its 95% interval over the prompts, tokens/s beside our autoregressive loop's and transformers' generate's, and
    which source wins: one only when its interval parts from every other source's."""
    groups = best_per_source(rows)
    if not groups:
        return ["## Where it pays", "", "No lossless timed cell: nothing to rank.", ""]
    lines = ["## The best cell of each draft source", "", f"Rule: {HEADLINE_RULE}.", ""]
    body, verdicts = [], []
    for (name, pol), best in groups.items():
        for d in sorted(best, key=lambda d: -best[d]["speedup"]):
            r = best[d]
            body.append([name or "-", policy_name(pol), exit_label(r), gamma_label(r), with_interval(r),
                         with_interval(r, "tokens_per_call"), num(r["tokens_per_s"], 1),
                         num(r["baseline_tokens_per_s"], 1), num(r.get("generate_tokens_per_s"), 1),
                         r.get("greedy_match") or "-"])
        verdicts.append(f"- {name or 'prompts'}, {policy_name(pol)}: {winner(best)}")
    lines += table(["prompt set", "policy", "source", "γ", "speedup [95%]", "tokens / verify call [95%]", "tok/s",
                    "autoregressive tok/s", "generate tok/s", "greedy identical"], body) + [""]
    return lines + verdicts + [""]


def short_section(rows):
    """The README's table: per prompt set and policy, only the leading source (its speedup and tokens per verify
    call with intervals) and whether its interval parts from the next best source's."""
    body = []
    for (name, pol), best in best_per_source(rows).items():
        order = sorted(best, key=lambda d: -best[d]["speedup"])
        r = best[order[0]]
        nxt = best[order[1]] if len(order) > 1 else None
        parted = "-" if nxt is None else ("yes" if parts(r, nxt) else "no")
        body.append([name or "-", policy_name(pol), f"{exit_label(r)}, γ {gamma_label(r)}", with_interval(r),
                     with_interval(r, "tokens_per_call"),
                     "-" if nxt is None else f"{exit_label(nxt)} {nxt['speedup']:.2f}", parted])
    return table(["prompt set", "policy", "leading source", "speedup [95%]", "tokens / verify call [95%]",
                  "next best", "intervals part"], body) + [""]


def winner(best):
    """Which source wins among `best` (source -> its best row): named only when its interval's low end is above
    every other source's high end; otherwise the leader and the sources it cannot be told from."""
    order = sorted(best, key=lambda d: -best[d]["speedup"])
    top = best[order[0]]
    if len(order) == 1:
        return f"{exit_label(top)} ({top['speedup']:.2f}x), the only source measured"
    tied = [d for d in order[1:] if not parts(top, best[d])]
    if not tied:
        return f"{exit_label(top)} wins ({top['speedup']:.2f}x; its interval parts from every other source's)"
    return (f"{exit_label(top)} leads ({top['speedup']:.2f}x) but cannot be told from "
            + ", ".join(f"{exit_label(best[d])} ({best[d]['speedup']:.2f}x)" for d in tied)
            + (" (no intervals: fewer than two prompts)" if interval(top) is None else " (their intervals overlap)"))


def cost_section(grid):
    lines = ["## Cost model per cell", ""]
    if not grid:
        return lines + ["No gamma-grid cells: no cost-model table.", ""]
    has_v = any(r.get("v") is not None for r in grid)
    body = []
    for r in grid:
        p, s = r.get("predicted_speedup"), r.get("speedup")
        body.append([exit_name(r), f"{r['temperature']:g}", r["gamma"], num(r.get("c")), *([num(r.get("v"))] if has_v
                     else []), num(r.get("alpha")), num(p, 2), num(s, 2), num(s / p if p and s else None, 2)])
    head = ["exit", "T", "γ", "c", *(["v"] if has_v else []), "α", "predicted", "measured", "measured / predicted"]
    return lines + table(head, body) + [
        "", "c: a draft step over a full step; v: a verification over a one-token full step; α: the probability "
        "that a draft is accepted given the ones before it were; predicted = (1 − α^(γ+1)) / ((1 − α)(γc + v)) "
        "over the realised draft lengths.", ""]


# ----------------------------------------------------------------------------------------------------------------
# The two plots


def plot_layers(sel, tf_rows, tf_key, path, title):
    """Accepted drafts per target call against the exit layer (untrained: circles, solid; trained: squares, dashed),
    and the teacher-forced agreement on a second panel when there is one."""
    from matplotlib.ticker import MaxNLocator
    panels = [p for p, there in (("gen", sel), ("tf", tf_rows)) if there]
    fig, axes = _figure(len(panels), (6.5 * len(panels), 4.8))
    axes = dict(zip(panels, axes if len(panels) > 1 else [axes]))
    styles = {"untrained": dict(marker="o", ls="-", color="C0"), "trained": dict(marker="s", ls="--", ms=8,
                                                                                color="C1")}
    for kind, style in styles.items() if sel else []:
        some = [r for r in sel if (r["exit"] == "untrained") == (kind == "untrained")]
        if some:
            axes["gen"].plot(*_by_layer(some, "avg_accepted"), label=f"{kind} exit", **style)
    if sel:
        axes["gen"].set(title="during generation", xlabel="exit layer L (decoder layers the draft runs)",
                        ylabel="accepted drafts per target call (tokens)", ylim=(0, None))
    tf_styles = (("untrained", "top1", "top-1 agreement", dict(marker="o", ls="-", color="C0")),
                 ("untrained", tf_key, "overlap", dict(marker="^", ls="-.", color="C2")),
                 ("trained", "top1", "top-1 agreement", dict(marker="s", ls="--", ms=8, color="C1")),
                 ("trained", tf_key, "overlap", dict(marker="D", ls=":", ms=7, color="C3")))
    for kind, key, label, style in tf_styles if tf_rows else []:
        some = [r for r in tf_rows if (r["exit"] == "untrained") == (kind == "untrained") and r.get(key) is not None]
        if some:
            axes["tf"].plot(*_by_layer(some, key), label=f"{kind} exit: {label}", **style)
    if tf_rows:
        axes["tf"].set(title=f"teacher-forced, {tf_rows[0]['tokens']} held-out tokens",
                       xlabel="exit layer L (decoder layers the draft runs)",
                       ylabel="agreement with the full model (fraction)", ylim=(0, 1))
    for ax in axes.values():
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Acceptance against the exit layer: {title}", fontsize=9)
    _save(fig, path)


def plot_gammas(grid, args, path, caption):
    """Speedup against gamma: one panel per temperature, one line per exit (its own marker), a dashed line at 1."""
    temps = [t for t in args.temperatures if any(same(r["temperature"], t) for r in grid)]
    fig, axes = _figure(len(temps), (6 * len(temps), 4.6))
    axes = axes if len(temps) > 1 else [axes]
    exits = list(dict.fromkeys((exit_name(r), r["exit_layer"]) for r in grid))
    gammas = sorted({r["gamma"] for r in grid})
    for ax, t in zip(axes, temps):
        for (e, L), marker in zip(exits, MARKERS + "o" * len(exits)):
            sel = [r for r in grid if exit_name(r) == e and same(r["temperature"], t) and r.get("speedup") is not None]
            if sel:
                ax.plot([r["gamma"] for r in sel], [r["speedup"] for r in sel], marker=marker, ms=7,
                        label=f"{e} (L{L})")
        ax.axhline(1.0, color="k", ls="--", lw=1, label="autoregressive (1.0)")
        ax.set(title=policy_name((t, args.top_p, args.top_k)), xlabel="γ (drafts per cycle, tokens)",
               ylabel="speedup (tokens/s over autoregressive tokens/s)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(gammas, [str(g) for g in gammas])
        ax.minorticks_off()
    fig.suptitle(f"Speedup against γ: {caption}", fontsize=9)
    _save(fig, path)


def sources_plots(rows, out, caption):
    """Two charts of the draft sources, with 95% interval bars: the best cell of each source per prompt set (one panel
    per policy), and speedup against γ per source on the first prompt set. Lines linking them for REPORT.md, or none
    when there is one source only."""
    groups = best_per_source(rows)
    if len({d for best in groups.values() for d in best}) < 2:
        return []
    policies = list(dict.fromkeys(p for _, p in groups))
    sets = list(dict.fromkeys(n for n, _ in groups))
    sources = list(dict.fromkeys(d for best in groups.values() for d in best))
    fig, axes = _figure(len(policies), (6.5 * len(policies), 4.6))
    axes = axes if len(policies) > 1 else [axes]
    width = 0.8 / len(sources)
    for ax, pol in zip(axes, policies):
        for j, d in enumerate(sources):
            xs, ys, errs = [], [], [[], []]
            for i, name in enumerate(sets):
                r = groups.get((name, pol), {}).get(d)
                if r:
                    lo, hi = interval(r) or (r["speedup"], r["speedup"])
                    xs.append(i + (j - (len(sources) - 1) / 2) * width)
                    ys.append(r["speedup"])
                    errs[0].append(r["speedup"] - lo)
                    errs[1].append(hi - r["speedup"])
            if xs:
                ax.bar(xs, ys, width, yerr=errs, capsize=2, label=d)
        ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.set_xticks(range(len(sets)), [str(n) for n in sets], fontsize=7, rotation=15)
        ax.set(title=policy_name(pol), ylabel="speedup over autoregressive (95% interval)")
    fig.suptitle(f"The best cell of each draft source per prompt set: {caption}", fontsize=9)
    _save(fig, out / SOURCES_PLOT)
    first = sets[0]
    fig, axes = _figure(len(policies), (6 * len(policies), 4.6))
    axes = axes if len(policies) > 1 else [axes]
    for ax, pol in zip(axes, policies):
        for d in sources:
            sel = sorted((r for r in rows if lossless(r) and prompt_set_of(r) == first
                          and (r.get("draft") or "exit") == d and (r["temperature"], r["top_p"], r["top_k"]) == pol and (r.get("tree_width") or 1) == 1
                          and not r.get("draft_stop")), key=lambda r: r["gamma"])
            best = {}
            for r in sel:  # one point per γ: the faster exit where several were measured
                if r["gamma"] not in best or r["speedup"] > best[r["gamma"]]["speedup"]:
                    best[r["gamma"]] = r
            if best:
                pts = [best[g] for g in sorted(best)]
                cis = [interval(r) or (r["speedup"], r["speedup"]) for r in pts]
                ax.errorbar([r["gamma"] for r in pts], [r["speedup"] for r in pts], capsize=3, marker="o",
                            yerr=[[r["speedup"] - c[0] for r, c in zip(pts, cis)],
                                  [c[1] - r["speedup"] for r, c in zip(pts, cis)]], label=d)
        ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        gammas = sorted({r["gamma"] for r in rows if prompt_set_of(r) == first})
        ax.set_xticks(gammas, [str(g) for g in gammas])
        ax.minorticks_off()
        ax.set(title=f"{first}, {policy_name(pol)}", xlabel="γ (chains)", ylabel="speedup (95% interval)")
    fig.suptitle(f"Speedup against γ per draft source: {caption}", fontsize=9)
    _save(fig, out / SOURCES_GAMMA_PLOT)
    return [f"![the best cell of each source per prompt set]({SOURCES_PLOT})", "",
            f"![speedup against γ per source]({SOURCES_GAMMA_PLOT})", ""]


# ----------------------------------------------------------------------------------------------------------------
# Publishing: the README's and the findings' results block, written from a report's rows (and checked against them by
# report_test.py), so that the documents cannot drift from the files they quote

PUBLISHED_ROWS = Path(__file__).resolve().parent / "docs" / "report_rows.jsonl"  # the rows the documents quote
BEGIN, END = "<!-- report: begin (report.py --publish writes this block) -->", "<!-- report: end -->"


def published_block(rows, command, short=False):
    """The documents' results block: where the rows were measured, the opening table and its verdicts (`short`: the
    leading source per prompt set and policy only, the README's), the best line."""
    machines = ", ".join(dict.fromkeys(describe_machine(r, r.get("dtype", "?")) for r in rows)) or "machine unknown"
    dates = ", ".join(sorted({r["date"] for r in rows if r.get("date")})) or "date not recorded"
    return [BEGIN, f"From `{command}` on {machines} ({sizes(rows)} per cell; {dates}; rows: "
                   f"`docs/report_rows.jsonl`):", ""] + (short_section(rows) if short else headline_section(rows)[2:]) + [
        f"`{best_line(rows)}`", END]


def publish(out, documents, command):
    """Copy OUT's rows to PUBLISHED_ROWS and rewrite each document's block from them, each file written atomically;
    a document without the markers is an error naming it, before anything is written."""
    rows = []
    for d in result_dirs(out):  # each row dated by its file (evaluate.py writes no date)
        day = datetime.date.fromtimestamp((d / RESULTS).stat().st_mtime).isoformat()
        rows += [{**r, "date": day} for r in read_results(d)]
    if not rows:
        raise UsageError(f"--publish: {out / EVAL} holds no rows to publish.")
    texts = {doc: Path(doc).read_text() for doc in documents}  # every document checked before anything is written
    for doc, text in texts.items():
        if BEGIN not in text or END not in text:
            raise UsageError(f"--publish: {doc} has no results block ({BEGIN} ... {END}).")
    write_atomically(PUBLISHED_ROWS, "".join(json.dumps({**r, "command": command}) + "\n" for r in rows))
    for doc, text in texts.items():
        head, rest = text.split(BEGIN, 1)
        short = Path(doc).name == "README.md"  # the guide gets the short table
        write_atomically(doc, head + "\n".join(published_block(rows, command, short)) + rest.split(END, 1)[1])


def document_blocks(text):
    """The results blocks of a document's text, each as its lines (markers included)."""
    return [[BEGIN] + part.split(END, 1)[0].strip("\n").split("\n") + [END] for part in text.split(BEGIN)[1:]]


# ----------------------------------------------------------------------------------------------------------------
# The command line

def write_report(out, commands=(), args=None):
    """OUT/REPORT.md and its plots; returns the best line (also the file's last line)."""
    out = Path(out)
    args = args or build_parser().parse_args([str(out)])
    rows = read_results(out / EVAL)
    source_rows = read_results(out / EVAL / SOURCES) if out / EVAL / SOURCES in result_dirs(out) else []
    tf_rows = read_rows(out / EVAL / f"{LAYER_SWEEP}.jsonl", key=None)
    exits = load_exits(out)
    if not rows and not exits:
        raise UsageError(f"OUT: {out} holds neither {EVAL}/{RESULTS} nor exit_L*/{CONFIG_FILE}: nothing to report.")
    commands = {"given": list(commands), "sweep": sweep_commands(out / EVAL)}
    machines = ", ".join(dict.fromkeys(describe_machine(r, r.get("dtype", "?")) for r in rows)) or "machine unknown"
    model = Path(str(next((r["model"] for r in rows), "?"))).name
    caption = f"{model} on {machines}; {sizes(rows) or 'no cells'} per cell"
    grid, left_out = grid_rows(rows, args)
    line = best_line(rows + source_rows)
    lines = (header(out, rows, tf_rows, exits, commands) + headline_section(rows + source_rows)
             + sources_plots(rows + source_rows, out, caption) + training_section(out, exits)
             + layer_section(rows, tf_rows, out, args, caption) + gamma_section(grid, left_out, out, args, caption)
             + where_section(rows, out, model) + cost_section(grid) + [line])
    lines = [x for i, x in enumerate(lines) if x or (i and lines[i - 1])]  # no two blank lines in a row
    (out / REPORT).write_text("\n".join(lines) + "\n")
    return line


def build_parser():
    p = Parser(prog="report.py", description="REPORT.md (and its plots) for a report directory: OUT/exit_L*/ from "
                                             "train.py and OUT/eval/ from evaluate.py.")
    p.add_argument("out", metavar="OUT", help="the report directory")
    p.add_argument("--command", action="append", default=[],
                   help="the command line that made OUT (e.g. the make command), shown in the header; repeatable")
    p.add_argument("--layer_gamma", type=int, default=4, help="the layer scan's gamma")
    p.add_argument("--layer_temperature", type=float, default=0.7, help="the layer scan's temperature")
    p.add_argument("--temperatures", nargs="+", type=float, default=[0.7, 1.0], help="the gamma grid's temperatures")
    p.add_argument("--top_p", type=float, default=0.95, help="top_p of the layer scan and the gamma grid")
    p.add_argument("--top_k", type=int, default=0, help="top_k of the layer scan and the gamma grid")
    p.add_argument("--publish", nargs="+", default=[], metavar="DOC",
                   help="also copy OUT's rows to docs/report_rows.jsonl and rewrite each DOC's results block (e.g. "
                        "README.md docs/findings.md) from them, under the first --command")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)

    def body(stop):
        if not Path(args.out).is_dir():
            raise UsageError(f"OUT: {args.out} is not a directory.")
        line = write_report(args.out, args.command, args)
        print(f"wrote {Path(args.out) / REPORT}")
        if args.publish:
            publish(args.out, args.publish, (args.command or [f"report.py {args.out}"])[0])
            print(f"wrote {PUBLISHED_ROWS.relative_to(PUBLISHED_ROWS.parents[1])} and the results block of "
                  f"{', '.join(args.publish)}")
        print(line, flush=True)
        return line
    return run_command("report.py", argv, body)


if __name__ == "__main__":
    main()
