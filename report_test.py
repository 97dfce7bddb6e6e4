"""The report (report.py): REPORT.md and its plots from a report directory built here, with rows in the real schema
(REAL_ROW: a row of out/speedup/eval/results.jsonl, copied as it was written), two trained exits and their logs."""
import hashlib
import json

import pytest

import plots
import report
from results import best_line, markdown_table, predicted_speedup

# One chain cell of out/speedup/eval/results.jsonl (evaluate.py, 2026-12-01), verbatim.
REAL_ROW = {
    "cell_id": "e68e397799efa9ef", "index": 4, "model": "smollm2-135m", "dataset": "sharegpt", "max_new_tokens": 128,
    "seed": 0, "dtype": "bfloat16", "device": "cpu", "cpu": "AMD EPYC", "cpu_flags": "avx2 avx512f avx512_bf16",
    "threads": 2, "torch": "2.13.0+cpu",
    "engine": "lean (qkv t:linear_t/linear_t, o t:x@t/linear_t, gate_up t:x@t/x@t, down w:w@x/linear, "
              "lm_head w:linear/linear)",
    "exit": "out/speedup/exit_L3", "exit_layer": 3, "gamma": 1, "temperature": 0.7, "top_p": 0.95, "top_k": 0,
    "draft_stop": 0.0, "tree_width": 1, "tree_nodes": 0, "prompts": 16, "new_tokens": 1798, "target_calls": 1294,
    "drafted": 1285, "accepted": 505, "avg_accepted": 0.3902627511591963, "acceptance_rate": 0.39299610894941633,
    "alpha": 0.39299610894941633, "avg_overlap": 0.39850051682727805, "avg_tv": 0.601499483172722,
    "accept_hist": [789, 505], "avg_draft_len": 0.9930448222565688, "draft_len_hist": [9, 1285],
    "tokens_per_cycle": 1.3894899536321483, "accept_by_depth": [0.39299610894941633], "draft_rows_hist": None,
    "matches_baseline": None, "greedy_match": None, "first_diff_mean": None, "baseline_new_tokens": 1798,
    "seconds": 51.522628892001194, "tokens_per_s": 34.897287631981385, "baseline_seconds": 58.69988690900118,
    "baseline_tokens_per_s": 30.630382692002946, "speedup": 1.139303024153611, "draft_step_ms": 5.008298000575451,
    "full_step_ms": 33.42409400011093, "c": 0.14984095008106516, "v": 0.9954927467053647,
    "predicted_speedup": 1.214955034753605, "paired_baseline": True}


def make_row(exit, layer, gamma, temperature, speedup, accepted, overlap=0.4, paired=True, **kw):
    """REAL_ROW moved to another cell, with the fields that follow from the changes made consistent."""
    r = {**REAL_ROW, "exit": exit, "exit_layer": layer, "gamma": gamma, "temperature": temperature,
         "paired_baseline": paired, **kw}
    calls = 1000
    r.update(target_calls=calls, accepted=round(accepted * calls), avg_accepted=accepted, avg_overlap=overlap,
             avg_tv=1 - overlap, draft_len_hist=[0] * gamma + [calls], drafted=gamma * calls, alpha=overlap,
             accept_hist=None, tokens_per_s=speedup * r["baseline_tokens_per_s"], speedup=speedup)
    r["predicted_speedup"] = predicted_speedup(r["alpha"], gamma, r["c"], r["draft_len_hist"], r["v"])
    r["cell_id"] = hashlib.sha256(json.dumps([exit, layer, gamma, temperature, paired, kw]).encode()).hexdigest()[:16]
    return r


# The gamma grid: (exit layer, T) -> speedup at gamma 2, 4, 8, 16. Best: L2 T0.7 -> 4, L2 T1.0 -> 8, L5 T0.7 -> 2,
# L5 T1.0 -> 16.
GRID = {(2, 0.7): (1.10, 1.30, 1.20, 0.90), (2, 1.0): (1.00, 1.50, 2.20, 1.10),
        (5, 0.7): (1.40, 1.00, 0.80, 0.60), (5, 1.0): (0.70, 0.80, 0.85, 0.95)}


def sweep_rows(root, untrained=True, scan=True, stops=True):
    exit_dir = lambda L: f"{root}/exit_L{L}"
    rows = []
    if scan:  # the layer scan, unpaired: untrained exits at 1..6 and both trained exits, gamma 4, T 0.7
        rows += [make_row("untrained", L, 4, 0.7, 0.5, 0.1 * L, paired=False) for L in range(1, 7) if untrained]
        # the same cell as the grid's L5 gamma 4 T 0.7, faster: the grid's paired row must win in the tables
        rows += [make_row(exit_dir(L), L, 4, 0.7, 1.9, 0.2 * L, paired=False) for L in (2, 5)]
        rows.append(make_row(exit_dir(4), 4, 4, 0.7, 1.05, 0.7, paired=False))  # in the scan only: no gamma grid
    for (L, t), speedups in GRID.items():  # the gamma grid, paired
        rows += [make_row(exit_dir(L), L, g, t, s, 0.2 * L + 0.01 * g) for g, s in zip((2, 4, 8, 16), speedups)]
    if stops:
        rows += [make_row(exit_dir(2), 2, 8, 0.7, s, 0.5, draft_stop=p) for p, s in ((0.2, 1.25), (0.4, 1.35))]
        rows.append(make_row(exit_dir(2), 2, 2, 0.0, 3.0, 1.5, tree_width=4, matches_baseline=False))  # not lossless
    return rows


def tf_row(exit, layer):
    top1 = 0.05 * layer + (0.2 if exit != "untrained" else 0.0)
    return {"exit": exit, "exit_layer": layer, "tokens": 4096, "kl": 5.0 / layer, "top1": top1,
            "overlap_t1": top1 + 0.01, "overlap_t07": top1 + 0.02, "vocab_mass": 1.0, "exit_ppl": 50.0,
            "teacher_ppl": 9.0, "tv_t1": 0.99 - top1, "tv_t07": 0.98 - top1, "sweep_id": "0123456789abcdef"}


def write_exit(out, layer, lstsq):
    """exit_L<layer>/ as train.py leaves it: exit_config.json, log.jsonl, train_curve.png."""
    d = out / f"exit_L{layer}"
    d.mkdir(parents=True)
    metrics = {"tokens": 10968, "kl": 1.0 + layer / 10, "top1": 0.3 + layer / 100, "overlap_t1": 0.31,
               "overlap_t07": 0.32, "vocab_mass": 0.91, "exit_ppl": 28.8, "teacher_ppl": 8.7}
    config = {"base_model": "smollm2-135m", "base_fingerprint": "48cbe843271eb11e", "exit_layer": layer,
              "adapter": "block", "trained": ["adapter", "head", "norm"], "step": 100 * layer, "metrics": metrics,
              "train_args": {"exit_layer": layer, "head_init": "lstsq" if lstsq else "copy", "max_steps": 100 * layer},
              "world_size": 2, "dtype": "bfloat16",
              "machine": {"cpu": "AMD EPYC", "cpu_flags": "avx2 avx512f avx512_bf16", "threads": 1,
                          "torch": "2.13.0+cpu"}}
    (d / "exit_config.json").write_text(json.dumps(config, indent=2))
    log = [{"step": 0, "untrained/top1": 0.04, "untrained/kl": 12.0}] if lstsq else []
    log += [{"step": 0, "val/top1": 0.2 + layer / 100, "val/overlap_t1": 0.2, "val/overlap_t07": 0.2},
            *({"step": s, "train/loss": 2.0 - s / 1000} for s in range(1, 4)),
            {"step": 100 * layer, **{f"val/{k}": v for k, v in metrics.items()}}]
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    plots.plot_curve(d)


def write_eval(out, rows, tf_rows=(), where_it_pays=True):
    d = out / "eval"
    d.mkdir(parents=True)
    (d / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    command = "python evaluate.py --exit_ckpt x --gammas 2 4 8 16 --tf_blocks 16 --tf_seq_len 256 --resume"
    (d / "summary.md").write_text(f"# Self-speculation sweep\n\n`{command}`\n\n{markdown_table(rows)}")
    if tf_rows:
        (d / "layer_sweep.jsonl").write_text("".join(json.dumps(r) + "\n" for r in tf_rows))
    if where_it_pays:
        (d / "where_it_pays.png").write_bytes(b"\x89PNG stand-in")  # evaluate.py's plot; the report only links it


def section(md, heading):
    """The lines of the section whose heading starts with `heading`, up to the next one."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("## " + heading))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start + 1:end]


def tables(lines):
    """Each Markdown table in lines, as a list of rows (lists of cell strings), the heading row first."""
    found, current = [], None
    for line in lines + [""]:
        if line.startswith("|") and not line.startswith("|---"):
            current = (current or []) + [[c.strip() for c in line.strip("|").split("|")]]
        elif not line.startswith("|---") and current:
            found.append(current)
            current = None
    return found


def as_dicts(table):
    return [dict(zip(table[0], r)) for r in table[1:]]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    write_exit(out, 2, lstsq=True)
    write_exit(out, 5, lstsq=False)
    rows = sweep_rows(out)
    tf = [tf_row("untrained", L) for L in range(1, 8)] + [tf_row(f"{out}/exit_L{L}", L) for L in (2, 5)]
    write_eval(out, rows, tf)
    return out, rows


def test_report_has_every_section_with_the_right_numbers(full, capsys):
    out, rows = full
    report.main([str(out), "--command", "make report REPORT_LAYERS='2 5'"])
    stdout = capsys.readouterr().out.splitlines()
    md = (out / "REPORT.md").read_text()
    line = best_line(rows)
    assert line.startswith("best lossless speedup: 2.20x (exit_L2, L 2, gamma 8")  # the tree at 3.0x is not lossless
    assert stdout[-1] == line == md.splitlines()[-1]
    headings = [x for x in md.splitlines() if x.startswith("#")]
    assert headings == ["# Self-speculation report: smollm2-135m", "## The best cell of each draft source", "## Training",
                        "## Against the exit layer (T=0.7, top_p=0.95, γ=4)",
                        "## Against γ (trained exits, top_p=0.95)", "## Where it pays", "## Cost model per cell"]
    assert "\n\n\n" not in md
    head = md.split("## Training")[0]
    assert "AMD EPYC [avx2 avx512f avx512_bf16], 2 threads, torch 2.13.0+cpu, bfloat16" in head
    assert "`make report REPORT_LAYERS='2 5'`" in head and "16 prompts x 128 new tokens per cell" in head
    assert "4096 held-out tokens (16 blocks x 256 tokens)" in head

    train = as_dicts(tables(section(md, "Training"))[0])
    assert [(t["exit"], t["L"], t["steps"], t["val top-1"], t["KL"]) for t in train] == [
        ("exit_L2", "2", "200", "0.320", "1.200"), ("exit_L5", "5", "500", "0.350", "1.500")]
    assert train[0]["top-1 untrained (before the head fit)"] == "0.040" and train[0]["top-1 at step 0"] == "0.220"
    assert train[1]["top-1 untrained (before the head fit)"] == "-" and train[1]["top-1 at step 0"] == "0.250"
    assert train[0]["curve"] == "[train_curve.png](exit_L2/train_curve.png)"

    layer = {t["L"]: t for t in as_dicts(tables(section(md, "Against the exit layer"))[0])}
    assert sorted(layer, key=int) == ["1", "2", "3", "4", "5", "6"]  # the sweep's layers (the plot has every TF layer)
    assert layer["3"]["untrained accepted"] == "0.300" and layer["3"]["trained accepted"] == "-"
    assert layer["4"]["trained accepted"] == "0.700"
    assert layer["5"]["trained accepted"] == "1.040"  # the grid's paired row (0.2 L + 0.01 gamma), not the scan's
    assert layer["5"]["untrained TV"] == "0.600" and "7" not in layer
    assert layer["3"]["TF top-1 untrained"] == "0.150" and layer["2"]["TF overlap T=0.7 trained"] == "0.320"

    gamma = section(md, "Against γ")
    grid, best = tables(gamma)
    assert "Measured at one γ only, so left out here: exit_L4." in gamma
    assert len(grid) == 1 + 16
    assert {(b["exit"], b["T"], b["best γ"], b["speedup"]) for b in as_dicts(best)} == {
        ("exit_L2", "0.7", "4", "1.30"), ("exit_L2", "1", "8", "2.20"), ("exit_L5", "0.7", "2", "1.40"),
        ("exit_L5", "1", "16", "0.95")}
    l5 = [g for g in as_dicts(grid) if g["exit"] == "exit_L5" and g["T"] == "0.7"]
    assert [(g["γ"], g["speedup"]) for g in l5] == [("2", "**1.40**"), ("4", "1.00"), ("8", "0.80"), ("16", "0.60")]
    assert l5[0]["tok/s"] == f"{1.4 * REAL_ROW['baseline_tokens_per_s']:.1f}" and l5[0]["avg accepted"] == "1.02"

    where = section(md, "Where it pays")
    assert "![where it pays](where_it_pays_report.png)" in where and (out / "where_it_pays_report.png").is_file()
    stop = as_dicts(tables(where)[0])
    assert [(s["exit"], s["best draft stop"], s["speedup"], s["speedup without a stop"]) for s in stop] == [
        ("exit_L2", "0.4", "1.35", "1.20")]

    cost = as_dicts(tables(section(md, "Cost model per cell"))[0])
    assert len(cost) == 16
    c = next(x for x in cost if x["exit"] == "exit_L2" and x["T"] == "1" and x["γ"] == "8")
    predicted = predicted_speedup(0.4, 8, REAL_ROW["c"], [0] * 8 + [1], REAL_ROW["v"])
    assert c["predicted"] == f"{predicted:.2f}" and c["measured"] == "2.20"
    assert c["measured / predicted"] == f"{2.2 / predicted:.2f}" and c["v"] == f"{REAL_ROW['v']:.3f}"

    for name in ("accepted_vs_layer_report.png", "speed_vs_gamma_report.png"):
        assert (out / name).stat().st_size > 10_000 and f"]({name})" in md
    assert str(out) not in md  # every path relative to OUT


def test_missing_pieces_are_one_line_notes(tmp_path, capsys):
    """No untrained cells, no teacher-forced sweep, no where-it-pays map, no draft stops, no exit directories."""
    rows = sweep_rows(tmp_path, untrained=False, stops=False)
    write_eval(tmp_path, rows, where_it_pays=False)
    report.main([str(tmp_path)])
    assert capsys.readouterr().out.splitlines()[-1] == best_line(rows)
    md = (tmp_path / "REPORT.md").read_text()
    assert "- command: not recorded" in md
    assert section(md, "Training")[1].startswith("No trained exits")
    layer = section(md, "Against the exit layer")
    assert any(x.startswith("No untrained exits among the cells") for x in layer)
    assert any(x.startswith("No teacher-forced layer sweep") for x in layer)
    assert list(as_dicts(tables(layer)[0])[0]) == ["L", "trained accepted", "trained overlap", "trained TV"]
    assert "![where it pays](where_it_pays_report.png)" in section(md, "Where it pays")  # drawn from the rows
    assert any(x.startswith("No cells with a draft stop") for x in section(md, "Where it pays"))
    assert (tmp_path / "accepted_vs_layer_report.png").is_file()  # the trained exits alone, one panel


def test_no_sweep_at_all_and_no_directory(tmp_path, capsys):
    write_exit(tmp_path, 3, lstsq=True)
    report.main([str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("best lossless speedup: none")
    md = (tmp_path / "REPORT.md").read_text()
    assert md.splitlines()[-1] == out[-1] and "No sweep cells at T=0.7" in md and "no gamma grid" in md
    assert "No gamma-grid cells: no cost-model table." in md
    assert not (tmp_path / "accepted_vs_layer_report.png").exists()
    for bad in (tmp_path / "missing", tmp_path / "exit_L3"):  # not a directory; a directory with nothing to report
        with pytest.raises(SystemExit) as e:
            report.main([str(bad)])
        assert e.value.code == 2 and "report.py: error: OUT: " in capsys.readouterr().err


def test_a_cell_measured_twice_keeps_its_paired_row():
    rows = [make_row("e/exit_L2", 2, 4, 0.7, 1.9, 0.4, paired=False), make_row("e/exit_L2/", 2, 4, 0.7, 1.3, 0.45),
            make_row("e/exit_L2", 2, 4, 0.7, 1.1, 0.5, paired=False)]
    assert [r["speedup"] for r in report.chains(rows)] == [1.3]
    assert [r["speedup"] for r in report.chains(rows[:1] + rows[2:])] == [1.1]  # neither paired: the later one


def test_the_header_counts_greedy_cells_that_stayed_bitwise_in_bf16():
    rows = [{"greedy_match": "8/8", "dtype": "bfloat16", "gpu": "NVIDIA H200"},
            {"greedy_match": "6/8", "dtype": "bfloat16", "gpu": "NVIDIA H200"},
            {"greedy_match": None, "dtype": "bfloat16"}, {"greedy_match": "8/8", "dtype": "float32"}]
    line, = report.greedy_bits_line(rows)
    assert "1 of 2 greedy cells" in line and "(GPU)" in line and "round apart" in line
    assert report.greedy_bits_line(rows[3:]) == []


def per_prompt(speedups, tokens=100, calls=50):
    """per_prompt records of prompts whose own speedups are `speedups`, their baselines of different speeds."""
    return [[tokens, tokens / (10.0 * (i + 1) * s), calls, tokens, tokens / (10.0 * (i + 1))]
            for i, s in enumerate(speedups)]


def test_the_opening_table_ranks_sources_only_where_their_intervals_part(tmp_path):
    def row(draft, temperature, speedups, layer=3):
        r = make_row(f"{tmp_path}/exit_L3" if draft != "lookup" else "none", layer if draft != "lookup" else 0, 4,
                     temperature, 0.0, 0.5, draft=draft, per_prompt=per_prompt(speedups))
        each = r["per_prompt"]
        r["tokens_per_s"] = sum(x[0] for x in each) / sum(x[1] for x in each)
        r["baseline_tokens_per_s"] = sum(x[3] for x in each) / sum(x[4] for x in each)
        r["speedup"] = r["tokens_per_s"] / r["baseline_tokens_per_s"]
        r["tokens_per_cycle"] = sum(x[0] for x in each) / sum(x[2] for x in each)
        return r
    rows = [row("exit", 0.7, [1.10, 1.12, 1.08, 1.11]), row("lookup", 0.7, [1.60, 1.70, 1.55, 1.65]),
            row("exit", 1.0, [1.20, 1.35, 0.95, 1.25]), row("lookup", 1.0, [1.25, 1.05, 1.15, 1.00])]
    write_eval(tmp_path, rows, where_it_pays=False)
    report.main([str(tmp_path)])
    md = (tmp_path / "REPORT.md").read_text()
    lines = section(md, "The best cell of each draft source")
    assert "Rule: a cell's speedup is its tokens/s over our autoregressive loop's" in "\n".join(lines)
    body = as_dicts(tables(lines)[0])
    assert [(b["policy"], b["source"]) for b in body] == [("T=0.7, top_p=0.95", "lookup"),
                                                            ("T=0.7, top_p=0.95", "exit_L3 L3"),
                                                            ("T=1, top_p=0.95", "exit_L3 L3"),
                                                            ("T=1, top_p=0.95", "lookup")]
    value, lo, hi = _parse(body[0]["speedup [95%]"])
    assert 1.55 <= lo < value < hi <= 1.70  # within the prompts' own speedups, around the pooled one
    assert body[0]["tokens / verify call [95%]"] == "2.00 [2.00, 2.00]"  # every prompt: 100 tokens in 50 calls
    verdicts = [x for x in lines if x.startswith("- ")]
    assert verdicts[0].endswith("T=0.7, top_p=0.95: lookup wins (1.62x; its interval parts from every other source's)")
    assert "T=1, top_p=0.95: exit_L3 L3 leads" in verdicts[1] and "cannot be told from lookup" in verdicts[1]


def _parse(cell):
    value, rest = cell.split(" [")
    lo, hi = rest.rstrip("]").split(", ")
    return float(value), float(lo), float(hi)


def test_publish_writes_the_documents_block_from_the_report_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "PUBLISHED_ROWS", tmp_path / "report_rows.jsonl")
    out = tmp_path / "run"
    write_eval(out, sweep_rows(out, scan=False, stops=False), where_it_pays=False)
    doc = tmp_path / "README.md"
    doc.write_text(f"# Guide\n\n## Results\n\n{report.BEGIN}\nstale 9.99x\n{report.END}\n\n## More\n")
    report.main([str(out), "--command", "make run", "--publish", str(doc)])
    text = doc.read_text()
    assert "stale" not in text and text.startswith("# Guide\n\n## Results\n\n") and text.endswith("\n\n## More\n")
    rows = [json.loads(x) for x in (tmp_path / "report_rows.jsonl").read_text().splitlines()]
    assert len(rows) == len(GRID) * 4 and {r["command"] for r in rows} == {"make run"}
    [block] = report.document_blocks(text)
    assert block == report.published_block(rows, "make run", short=True)  # README.md: the short table
    assert block[3].startswith("| prompt set | policy | leading source |")
    assert block[-2] == f"`{best_line(rows)}`" and "best lossless speedup: 2.20x" in block[-2]
    doc.write_text(text.replace("2.20", "2.30"))  # a number edited by hand no longer matches
    assert report.document_blocks(doc.read_text()) != [block]
    (tmp_path / "other.md").write_text("no block\n")
    published = (tmp_path / "report_rows.jsonl").read_text()
    before = doc.read_text()
    with pytest.raises(SystemExit) as e:  # the README listed first: still nothing written, nothing half-written
        report.main([str(out), "--command", "make report", "--publish", str(doc), str(tmp_path / "other.md")])
    assert e.value.code == 2
    assert (tmp_path / "report_rows.jsonl").read_text() == published and doc.read_text() == before


def test_the_readme_and_findings_quote_the_published_report_rows():
    """README.md's and docs/findings.md's results blocks are exactly what report.py renders from the rows they
    quote (docs/report_rows.jsonl): a number edited by hand, or rows replaced without republishing, fails here."""
    root = report.PUBLISHED_ROWS.parents[1]
    rows = [json.loads(x) for x in report.PUBLISHED_ROWS.read_text().splitlines()]
    for doc, short in (("README.md", True), ("docs/findings.md", False)):
        expected = report.published_block(rows, rows[0]["command"], short)
        blocks = report.document_blocks((root / doc).read_text())
        assert blocks and all(b == expected for b in blocks), doc


def test_the_sources_are_charted_with_their_intervals(tmp_path):
    rows = []
    for draft, layer in (("exit", 3), ("lookup", 0)):
        for gamma in (1, 2):
            r = make_row(f"{tmp_path}/exit_L3" if layer else "none", layer, gamma, 0.7, 1.0 + gamma / 10, 0.5,
                         draft=draft, per_prompt=per_prompt([1.0 + gamma / 10, 1.05 + gamma / 10, 0.95 + gamma / 10]))
            rows.append(r)
    write_eval(tmp_path, rows, where_it_pays=False)
    report.main([str(tmp_path)])
    md = (tmp_path / "REPORT.md").read_text()
    for name in (report.SOURCES_PLOT, report.SOURCES_GAMMA_PLOT):
        assert f"]({name})" in md and (tmp_path / name).stat().st_size > 10_000
    one = tmp_path / "one"
    write_eval(one, rows[:2], where_it_pays=False)  # one source: nothing to chart side by side
    report.main([str(one)])
    assert report.SOURCES_PLOT not in (one / "REPORT.md").read_text()
