"""The sweep's plots: each takes the rows of one sweep (evaluate.py's results.jsonl) and writes one PNG.

    accepted_vs_layer.png, overlap_vs_layer.png   acceptance and draft/target overlap against the exit layer
    speed_vs_gamma.png, speedup_heatmap.png        measured speed against gamma, and speedup per exit x gamma
    measured_vs_predicted.png                      measured speedup against the cost model's prediction
    where_it_pays.png                              the (a, c) plane with break-even curves: where drafting pays
    speed_vs_width.png                             speedup against the tree width (sweeps with --tree_widths)
    teacher_forced_layers.png                      teacher-forced agreement of every exit at every layer
    train_curve.png (plot_curve)                   a training run's loss and validation metrics against step

The one-policy plots use `plot_choice`: the first sampling policy and the middle gamma.
"""
import itertools
import json
import math
import statistics
import textwrap
from pathlib import Path

import torch

from checkpoints import CONFIG_FILE, LOG_FILE
from drafts import SOURCES
from results import BREAK_EVEN_GAMMAS, break_even_c, describe_machine, exit_label, gamma_label, policy_name, sizes

MARKERS = "s^Dv*P"


def plot_choice(rows):
    """The policy and gamma of the one-policy plots: the first sampling policy (else greedy) and the middle gamma."""
    policies = _policies(rows)
    gammas = sorted({r["gamma"] for r in rows})
    return next((p for p in policies if p[0] > 0), policies[0]), gammas[(len(gammas) - 1) // 2]


def _policies(rows):
    return list(dict.fromkeys((r["temperature"], r["top_p"], r["top_k"]) for r in rows))


def _select(rows, policy=None, gamma=None, exit=None):
    return [r for r in rows if (policy is None or (r["temperature"], r["top_p"], r["top_k"]) == policy)
            and (gamma is None or r["gamma"] == gamma) and (exit is None or r["exit"] == exit)]


def _trained(rows):
    return list(dict.fromkeys(r["exit"] for r in rows if r["exit"] != "untrained"))


def _by_layer(rows, key):
    pts = sorted((r["exit_layer"], r[key]) for r in rows if r.get(key) is not None)
    return [x for x, _ in pts], [y for _, y in pts]


def _against_layer(ax, rows, key, label, **style):
    """One line for the untrained exits, one marker per trained exit (same colour), against the exit layer."""
    line, = ax.plot(*_by_layer(_select(rows, exit="untrained"), key), "o-", label=f"untrained{label}", **style)
    for m, name in zip(MARKERS, _trained(rows)):
        ax.plot(*_by_layer(_select(rows, exit=name), key), m, ms=10, color=line.get_color(),
                label=f"trained {Path(name).name}{label}")


def _key_temperature(key):
    """The temperature of an overlap column: overlap_t1 and overlap_t07 (train.py's names), or overlap_t<T>."""
    suffix = key[len("overlap_t"):]
    return {"1": 1.0, "07": 0.7}.get(suffix) or float(suffix)


def _figure(ncols=1, size=(7, 4.5)):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(1, ncols, figsize=size)


def _save(fig, path, grid=True):
    """Integer layer ticks, legends and grids on every axis; then write the PNG."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    for ax in fig.axes if grid else []:
        if ax.get_xlabel() == "exit layer L":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accepted(rows, path, model_name):
    """(1) accepted drafts per verification against the exit layer, at one policy and gamma."""
    policy, gamma = plot_choice(rows)
    fig, ax = _figure()
    _against_layer(ax, _select(rows, policy, gamma), "avg_accepted", "")
    ax.set(title=f"Accepted drafts per verification\n{model_name}, {policy_name(policy)}, γ={gamma}",
           xlabel="exit layer L", ylabel="avg accepted drafts per target call")
    ax.set_ylim(bottom=0)
    _save(fig, path)


def plot_overlap(rows, path, model_name):
    """(2) avg_overlap and avg_tv against the exit layer, one line per policy, at one gamma."""
    _, gamma = plot_choice(rows)
    fig, axes = _figure(2, (11, 4.5))
    for key, ax, title in zip(("avg_overlap", "avg_tv"), axes, ("Overlap Σ min(p, q)", "Total variation 1 - overlap")):
        for policy in _policies(rows):
            _against_layer(ax, _select(rows, policy, gamma), key, f", {policy_name(policy)}")
        ax.set(title=f"{title} (γ={gamma})", xlabel="exit layer L", ylabel=key, ylim=(0, 1))
    fig.suptitle(f"Draft/target agreement during generation, {model_name} (greedy: temperature-1 distributions)")
    _save(fig, path)


def plot_speed(rows, path, model_name):
    """(3) tokens/s and speedup against gamma for an early, a middle and a late layer, and each trained exit."""
    policy, _ = plot_choice(rows)
    rows = _select(rows, policy)
    layers = sorted({r["exit_layer"] for r in _select(rows, exit="untrained")})
    early_middle_late = dict.fromkeys([layers[0], layers[len(layers) // 2], layers[-1]]) if layers else []
    picks = [("untrained", L) for L in early_middle_late]
    picks += list(dict.fromkeys((r["exit"], r["exit_layer"]) for r in rows if r["exit"] != "untrained"))
    gammas = sorted({r["gamma"] for r in rows})
    fig, axes = _figure(2, (11, 4.5))
    for name, L in picks:
        sel = sorted((r for r in _select(rows, exit=name) if r["exit_layer"] == L), key=lambda r: r["gamma"])
        label = f"untrained L{L}" if name == "untrained" else f"trained {Path(name).name} (L{L})"
        for key, ax in zip(("tokens_per_s", "speedup"), axes):
            style = "o-" if name == "untrained" else "s--"
            ax.plot([r["gamma"] for r in sel], [r[key] for r in sel], style, label=label)
    base = statistics.mean(r["baseline_tokens_per_s"] for r in rows)
    axes[0].axhline(base, color="k", ls=":", label=f"autoregressive ({base:.1f})")
    axes[1].axhline(1.0, color="k", ls=":", label="autoregressive")
    for ax, ylabel, title in zip(axes, ("tokens / s", "speedup over autoregressive"), ("Throughput", "Speedup")):
        ax.set(title=f"{title} against γ, {model_name}, {policy_name(policy)}", xlabel="γ (draft length)",
               ylabel=ylabel)
        ax.set_xscale("log", base=2)
        ax.set_xticks(gammas, [str(g) for g in gammas])
        ax.minorticks_off()
    _save(fig, path)


def plot_heatmap(rows, path, model_name):
    """(4) speedup over exit x gamma, at one policy; green above 1, red below."""
    from matplotlib.colors import TwoSlopeNorm
    policy, _ = plot_choice(rows)
    rows = _select(rows, policy)
    exits = sorted(dict.fromkeys((r["exit"], r["exit_layer"]) for r in rows), key=lambda e: (e[0] != "untrained", e[1]))
    gammas = sorted({r["gamma"] for r in rows})
    grid = torch.full((len(exits), len(gammas)), float("nan"))
    for r in rows:
        if r["speedup"] is not None:
            grid[exits.index((r["exit"], r["exit_layer"])), gammas.index(r["gamma"])] = r["speedup"]
    finite = grid[~grid.isnan()].tolist() or [1.0]
    fig, ax = _figure(size=(2.5 + 1.1 * len(gammas), 1.6 + 0.5 * len(exits)))
    im = ax.imshow(grid.numpy(), cmap="RdYlGn", aspect="auto",
                   norm=TwoSlopeNorm(vcenter=1.0, vmin=min(min(finite), 0.99), vmax=max(max(finite), 1.01)))
    for i, j in itertools.product(range(len(exits)), range(len(gammas))):
        if not math.isnan(grid[i, j]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(gammas)), [str(g) for g in gammas])
    ax.set_yticks(range(len(exits)), [f"L{L}" if n == "untrained" else f"L{L} trained" for n, L in exits])
    ax.set(title=f"Speedup, {model_name}, {policy_name(policy)}", xlabel="γ (draft length)", ylabel="exit")
    fig.colorbar(im, ax=ax, label="speedup over autoregressive")
    _save(fig, path, grid=False)


def plot_predicted(rows, path, model_name):
    """(5) measured against predicted speedup, every cell."""
    fig, ax = _figure(size=(6, 5.5))
    for kind, m in (("untrained", "o"), ("trained", "s")):
        for t in sorted({r["temperature"] for r in rows}):
            pts = [(r["predicted_speedup"], r["speedup"]) for r in rows
                   if (r["exit"] == "untrained") == (kind == "untrained") and r["temperature"] == t
                   and r["predicted_speedup"] is not None and r["speedup"] is not None]
            if pts:
                ax.scatter(*zip(*pts), marker=m, alpha=0.8, label=f"{kind}, {'greedy' if t == 0 else f'T={t:g}'}")
    top = 1.05 * max([v for r in rows for v in (r["predicted_speedup"], r["speedup"]) if v is not None] + [1.0])
    ax.plot([0, top], [0, top], "k:", label="measured = predicted")
    ax.set(title=f"Measured against predicted speedup, {model_name}\npredicted = (1 - α^(γ+1)) / ((1 - α)(γc + 1))",
           xlabel="predicted speedup", ylabel="measured speedup", xlim=(0, top), ylim=(0, top))
    _save(fig, path)


def plot_teacher_forced(tf_rows, path, model_name):
    """(6) teacher-forced top-1 agreement and overlaps of every layer's exit."""
    fig, ax = _figure(size=(8, 4.8))
    keys = ["top1"] + sorted((k for k in tf_rows[0] if k.startswith("overlap_t")), key=_key_temperature)
    for key in keys:
        label = "top-1 agreement (greedy)" if key == "top1" else f"overlap at T={_key_temperature(key):g}"
        _against_layer(ax, tf_rows, key, f": {label}", ms=4)
    ax.set(title=f"Teacher-forced agreement of the exit with the full model\n{model_name}, "
                 f"{tf_rows[0]['tokens']} held-out tokens", xlabel="exit layer L", ylabel="agreement / overlap",
           ylim=(0, 1))
    _save(fig, path)


def plot_where_it_pays(rows, path, model_name):
    """(7) The map of where self-speculation pays: the (a, c) plane, a = per-draft acceptance (the cells' alpha),
    c = draft step cost / full step cost, with the break-even curves (predicted speedup 1) for gamma 1, 2, 4 (at the
    cells' verification cost ratio v when they have one, else v = 1) and every measured cell as a point, labelled
    exit, L and gamma. A cell below its gamma's curve is predicted to beat autoregressive decoding."""
    fig, ax = _figure(size=(8, 6))
    vs = [r["v"] for r in rows if r.get("v") is not None]
    v = statistics.median(vs) if vs else 1.0
    grid = [i / 200 for i in range(201)]
    gammas = sorted(set(BREAK_EVEN_GAMMAS) | {r["gamma"] for r in rows})
    colour = {g: f"C{i % 10}" for i, g in enumerate(gammas)}
    for g in BREAK_EVEN_GAMMAS:
        ax.plot(grid, [break_even_c(a, g, v) for a in grid], color=colour[g], label=f"break-even, γ={g}")
    for g in gammas:  # the colours of the cells' other gammas get a key too
        if g not in BREAK_EVEN_GAMMAS:
            ax.scatter([], [], color=colour[g], marker="s", label=f"cells at γ={g} (no curve drawn)")
    # a cell without the exit has as c the lookup's own time (no draft step); exit+lookup cells keep the exit's
    pts = [{**r, "c": r.get("c_lookup") or 0.0} if not SOURCES[r.get("draft") or "exit"].exit else r for r in rows
           if r.get("alpha") is not None and r.get("c") is not None]
    lookups = [r for r in pts if not SOURCES[r.get("draft") or "exit"].exit]
    if lookups:
        ax.scatter([r["alpha"] for r in lookups], [r["c"] for r in lookups], marker="X", s=80, zorder=4,
                   c=[colour[r["gamma"]] for r in lookups], edgecolors="k", linewidths=0.5,
                   label="lookup or recycled (no model call; c: the lookup's own time; colour: γ)")
    pts_exit = [r for r in pts if SOURCES[r.get("draft") or "exit"].exit]
    kinds = ((True, False, "o", "greedy chains"), (False, False, "^", "sampling chains"),
             (True, True, "*", "greedy trees (α per level)"), (False, True, "P", "sampling trees (α per level)"))
    for greedy, tree, marker, label in kinds:
        sel = [r for r in pts_exit if (r["temperature"] == 0) == greedy
               and ((r.get("tree_width") or 1) > 1) == tree]
        for trained in (True, False):  # trained exits filled, untrained ones hollow: told apart without colour
            some = [r for r in sel if (r["exit"] != "untrained") == trained]
            if some:
                colours = [colour[r["gamma"]] for r in some]
                ax.scatter([r["alpha"] for r in some], [r["c"] for r in some], marker=marker,
                           s=70 if tree else 36, zorder=3, linewidths=0.5 if trained else 1.2,
                           c=colours if trained else None, facecolors=None if trained else "none",
                           edgecolors="k" if trained else colours)
                ax.scatter([], [], marker=marker, color="k" if trained else "w", edgecolors="k", linewidths=0.8,
                           label=f"{label}, {'trained' if trained else 'untrained'} exits (colour: γ)")
    seen = set()
    for r in sorted(pts, key=lambda r: r["alpha"]):  # every cell labelled when few; else each exit once
        key = (exit_label(r), r["exit_layer"])
        if len(pts) <= 12 or key not in seen:
            seen.add(key)
            text = f"{exit_label(r)} γ{gamma_label(r)}" if len(pts) <= 12 else exit_label(r)
            ax.annotate(text, (r["alpha"], r["c"]), fontsize=6, xytext=(-3, 4), textcoords="offset points",
                        ha="right" if len(pts) > 12 else "left")
    top = max([1.05] + [1.1 * r["c"] for r in pts])
    machines = ", ".join(dict.fromkeys(describe_machine(r, r.get("dtype", "?")) for r in rows if r.get("cpu")))
    # wrapped: one long machine line was cut off at both sides of the figure
    where = "\n" + "\n".join(textwrap.wrap(f"{machines}; {sizes(rows)} a cell", 72)) if machines else ""
    ax.set(title=f"Where self-speculation pays, {model_name}\nbelow a curve: predicted speedup > 1 at that γ "
                 f"(v = {v:.2f}){where}", xlabel="a: per-draft acceptance α (fraction)",
           ylabel="c: draft step / full step (time ratio)", xlim=(0, 1), ylim=(0, top))
    ax.legend(fontsize=7, loc="upper left")
    _save(fig, path)


def plot_speed_vs_width(rows, path, model_name):
    """(8) measured speedup against the tree width (1: the chain), one line per policy, gamma and node budget."""
    fig, ax = _figure(size=(7.5, 4.8))
    lines = {}
    for r in rows:
        if r.get("speedup") is not None:
            budget = "" if (r.get("tree_width") or 1) == 1 or not r.get("tree_nodes") else f", {r['tree_nodes']} nodes"
            key = (policy_name((r["temperature"], r["top_p"], r["top_k"])), r["gamma"], budget, exit_label(r))
            lines.setdefault(key, []).append((r.get("tree_width") or 1, r["speedup"]))
    widths = sorted({w for pts in lines.values() for w, _ in pts})
    for (policy, gamma, budget, exit), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([w for w, _ in pts], [s for _, s in pts], "o-" if policy == "greedy" else "s--",
                label=f"{exit}, {policy}, γ={gamma}{budget}")
    ax.axhline(1.0, color="k", ls=":", label="autoregressive")
    ax.set(title=f"Speedup against the tree width (candidates per node), {model_name}",
           xlabel="tree width K (1: one chain of drafts)", ylabel="speedup over autoregressive")
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.minorticks_off()
    _save(fig, path)


PLOTS = {"accepted_vs_layer.png": plot_accepted, "overlap_vs_layer.png": plot_overlap,
         "speed_vs_gamma.png": plot_speed, "speedup_heatmap.png": plot_heatmap,
         "measured_vs_predicted.png": plot_predicted, "where_it_pays.png": plot_where_it_pays,
         "speed_vs_width.png": plot_speed_vs_width}
# These draw every cell; the others draw one point per (exit, gamma, policy): the cells of the sweep's first
# --draft_stop value.
ALL_CELL_PLOTS = ("measured_vs_predicted.png", "where_it_pays.png")
TREE_PLOTS = ("speed_vs_width.png",)  # drawn only when the sweep has trees; the others then draw its chains


def make_plots(rows, tf_rows, out_dir, model_name):
    """Write the plots the rows have data for into out_dir; returns their paths."""
    paths = []
    stops = list(dict.fromkeys(r.get("draft_stop", 0.0) for r in rows))
    trees = any((r.get("tree_width") or 1) > 1 for r in rows)
    chains = [r for r in rows if (r.get("tree_width") or 1) == 1] or rows
    for name, plot in PLOTS.items() if rows else []:
        if name in TREE_PLOTS and not trees:
            continue
        some = rows if name in ALL_CELL_PLOTS + TREE_PLOTS else chains
        if name not in ALL_CELL_PLOTS:
            some = [r for r in some if r.get("draft_stop", 0.0) == stops[0]]
        plot(some, Path(out_dir) / name, model_name)
        paths.append(Path(out_dir) / name)
    if tf_rows:
        plot_teacher_forced(tf_rows, Path(out_dir) / "teacher_forced_layers.png", model_name)
        paths.append(Path(out_dir) / "teacher_forced_layers.png")
    return paths


# ----------------------------------------------------------------------------------------------------------------
# The training curve (train.py)

CURVE_FILE = "train_curve.png"


def plot_curve(out_dir):
    """train_curve.png from log.jsonl: train loss, and validation agreement and overlap, against step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = [json.loads(line) for line in (Path(out_dir) / LOG_FILE).read_text().splitlines() if line.strip()]
    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if "val/top1" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax1.plot([r["step"] for r in train], [r["train/loss"] for r in train], lw=0.8)
    config = Path(out_dir) / CONFIG_FILE  # the exit's layer and loss, when train.py has written its config
    config = json.loads(config.read_text()) if config.is_file() else {}
    loss = config.get("train_args", {}).get("loss", "kl")
    which = f"exit at layer {config['exit_layer']}, " if "exit_layer" in config else ""
    ax1.set(xlabel="step", ylabel=f"train loss ({loss})", title=f"{which}train loss: {loss}")
    for key, label in (("val/top1", "top-1 agreement"), ("val/overlap_t1", "overlap T=1.0"),
                       ("val/overlap_t07", "overlap T=0.7")):
        ax2.plot([r["step"] for r in val], [r[key] for r in val], marker="o", ms=3, label=label)
    before = [r for r in records if "untrained/top1" in r]
    if before:
        ax2.plot([0], [before[0]["untrained/top1"]], "kx", label="top-1 before the lstsq head fit")
    ax2.set(xlabel="step", ylabel="validation", title="exit vs full model (validation)", ylim=(0, 1))
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(Path(out_dir) / CURVE_FILE, dpi=110)
    plt.close(fig)
