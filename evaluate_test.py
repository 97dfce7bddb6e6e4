"""The sweep (evaluate.py): command line, results files, resume, several processes, bad input, plots, prompt
files. A tiny model saved to disk stands in for SmolLM2."""
import hashlib
import itertools
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import data_utils
import evaluate
import plots
from conftest import make_tiny_llama, make_tiny_tokenizer
from generate_test import PRUNED, perturbed_exit
from evaluate import Cell, make_cells, parse_layers
from cli import DataError
from results import TIMING_FIELDS, best_line, predicted_speedup, read_rows
from truncated_llama import load_base_model, model_fingerprint
from checkpoints import save_exit
from tuned_llama import EarlyExit

PLOTS = ("accepted_vs_layer.png", "overlap_vs_layer.png", "speed_vs_gamma.png", "speedup_heatmap.png",
         "measured_vs_predicted.png", "where_it_pays.png", "teacher_forced_layers.png")
REPO = Path(__file__).resolve().parent


def save_tiny_model(path, seed):
    make_tiny_llama(layers=4, init_std=0.2, seed=seed).save_pretrained(path)
    make_tiny_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A 4-layer model on disk, a checkpoint at layer 2 for it (and one with a pruned head), one for another model,
    and a prompts.jsonl."""
    root = tmp_path_factory.mktemp("sweep")
    model = save_tiny_model(root / "model", seed=3)
    base, _ = load_base_model(model)
    save_exit(perturbed_exit(base, 2, adapter="block"), root / "exit_L2", base_name=model,
              base_fingerprint=model_fingerprint(base), trained=("adapter",))
    other = load_base_model(save_tiny_model(root / "other", seed=4))[0]
    save_exit(EarlyExit(other, 2), root / "other_exit", base_name="other", base_fingerprint=model_fingerprint(other))
    save_exit(perturbed_exit(base, 2, adapter="block", vocab=PRUNED), root / "pruned_L2", base_name=model,
              base_fingerprint=model_fingerprint(base), trained=("adapter", "head"))
    lines = [{"prompt": f"Tell me about the number {i} and the sea."} for i in range(3)]
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there " * 30}]
    lines.append({"messages": chat})
    (root / "prompts.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (root / "bad_prompts.jsonl").write_text(json.dumps(lines[0]) + "\n{bad json\n" + json.dumps(lines[1]) + "\n")
    return root


def sweep_argv(root, out_dir, *extra):
    return ["--model", str(root / "model"), "--dataset", str(root / "prompts.jsonl"), "--exit_layers", "1", "3",
            "--exit_ckpt", str(root / "exit_L2"), "--gammas", "1", "3", "--temperatures", "0", "1.0",
            "--num_prompts", "2", "--max_new_tokens", "10", "--tf_blocks", "2", "--tf_seq_len", "32",
            "--dtype", "float32", "--out_dir", str(out_dir), *extra]  # float32: greedy must equal the baseline


def without_timings(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def assert_same_rows(a, b):
    """Equal apart from timings; floats to 1e-6 (sums over a different number of threads round differently)."""
    a, b = without_timings(a), without_timings(b)
    assert [list(r) for r in a] == [list(r) for r in b]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if not isinstance(v, float)} == {
            k: v for k, v in y.items() if not isinstance(v, float)}
        assert {k: v for k, v in x.items() if isinstance(v, float)} == pytest.approx(
            {k: v for k, v in y.items() if isinstance(v, float)}, rel=1e-6, abs=1e-9)


@pytest.fixture(scope="module")
def full_sweep(assets):
    out = assets / "full"
    evaluate.main(sweep_argv(assets, out))
    return out


def test_sweep_rows_are_consistent(full_sweep):
    rows = read_rows(full_sweep / "results.jsonl")
    assert len(rows) == 3 * 2 * 2 and len({r["cell_id"] for r in rows}) == len(rows)  # exits x gammas x policies
    assert [r["index"] for r in rows] == list(range(len(rows)))
    for r in rows:
        assert 0 <= r["accepted"] <= r["drafted"]
        assert 0 <= r["avg_overlap"] <= 1 and r["avg_tv"] == pytest.approx(1 - r["avg_overlap"])
        assert r["speedup"] == pytest.approx(r["tokens_per_s"] / r["baseline_tokens_per_s"])
        assert sum(r["accept_hist"]) == r["target_calls"] and r["accepted"] + r["target_calls"] == r["new_tokens"]
        assert r["acceptance_rate"] <= r["alpha"] <= 1
        assert r["draft_stop"] == 0.0 and sum(r["draft_len_hist"]) == r["target_calls"]
        assert sum(d * n for d, n in enumerate(r["draft_len_hist"])) == r["drafted"]
        assert r["avg_draft_len"] == pytest.approx(r["drafted"] / r["target_calls"])
        assert r["v"] > 0 and r["predicted_speedup"] == pytest.approx(
            predicted_speedup(r["alpha"], r["gamma"], r["c"], r["draft_len_hist"], r["v"]))
        assert r["c"] > 0 and r["new_tokens"] == r["baseline_new_tokens"] == 2 * 10
        # per prompt (the intervals' input): its tokens, seconds and verify calls, and its baseline's, summing to the row
        each = r["per_prompt"]
        assert len(each) == r["prompts"] == 2
        assert [sum(x[i] for x in each) for i in (0, 2, 3)] == [r["new_tokens"], r["target_calls"],
                                                               r["baseline_new_tokens"]]
        assert sum(x[1] for x in each) == pytest.approx(r["seconds"], abs=1e-5)
        if not r["paired_baseline"]:
            assert sum(x[4] for x in each) == pytest.approx(r["baseline_seconds"], abs=1e-5)
        # beside transformers' generate on the same prompts and policy (--peer, on by default)
        assert r["generate_tokens_per_s"] > 0 and r["peer_ar_tokens_per_s"] > 0
        assert r["ar_vs_generate"] == pytest.approx(r["peer_ar_tokens_per_s"] / r["generate_tokens_per_s"])
        assert r["speedup_vs_generate"] == pytest.approx(r["speedup"] * r["ar_vs_generate"])
        if r["temperature"] == 0:
            assert r["matches_baseline"] is True and r["top_p"] == 1.0
            assert r["generate_greedy_match"] == "2/2"  # float32: our loop gives generate's tokens
        else:
            assert r["matches_baseline"] is None and r["top_p"] == 0.95 and r["generate_greedy_match"] is None
    peers = {(r["temperature"], r["generate_tokens_per_s"]) for r in rows}
    assert len(peers) == 2  # timed once per policy, not per cell
    assert {(r["exit"] == "untrained", r["exit_layer"]) for r in rows} == {(True, 1), (True, 3), (False, 2)}
    for name in PLOTS + ("summary.csv", "summary.md", "layer_sweep.csv"):
        assert (full_sweep / name).stat().st_size > 0, name
    assert len((full_sweep / "summary.csv").read_text().splitlines()) == len(rows) + 1
    tf = [json.loads(line) for line in (full_sweep / "layer_sweep.jsonl").read_text().splitlines()]
    assert [(r["exit"] == "untrained", r["exit_layer"]) for r in tf] == [(True, 1), (True, 2), (True, 3), (False, 2)]
    for r in tf:
        assert 0 <= r["top1"] <= 1 and 0 <= r["overlap_t1"] <= 1 and r["tv_t07"] == pytest.approx(1 - r["overlap_t07"])
        assert r["kl"] >= 0 and r["exit_ppl"] > 1 and r["tokens"] > 0


def test_killed_sweep_resumes_every_cell_exactly_once(assets, full_sweep):
    out = assets / "resumed"
    evaluate.main(sweep_argv(assets, out, "--stop_after", "5"))  # as if killed after 5 cells...
    with open(out / "results.jsonl", "a") as f:  # ... in the middle of writing the 6th
        f.write('{"cell_id": "0123", "index": 5, "new_to')
    assert len(read_rows(out / "results.jsonl")) == 5
    with pytest.raises(SystemExit) as e:  # refuses to start over an existing sweep
        evaluate.main(sweep_argv(assets, out))
    assert e.value.code == 2
    first = read_rows(out / "results.jsonl")
    evaluate.main(sweep_argv(assets, out, "--resume"))
    rows = read_rows(out / "results.jsonl")
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows) == 12
    assert rows[:5] == first  # finished cells were skipped, not rerun
    assert_same_rows(rows, read_rows(full_sweep / "results.jsonl"))
    evaluate.main(sweep_argv(assets, out, "--resume"))  # nothing left to do: the same rows again
    assert read_rows(out / "results.jsonl") == rows


def test_two_processes_give_the_single_process_rows(assets, full_sweep):
    out = assets / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "evaluate.py"), *sweep_argv(assets, out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not list(out.glob("results.rank*.jsonl"))  # merged into results.jsonl
    assert_same_rows(read_rows(out / "results.jsonl"), read_rows(full_sweep / "results.jsonl"))
    tf = lambda d: [json.loads(line) for line in (d / "layer_sweep.jsonl").read_text().splitlines()]
    assert_same_rows(tf(out), tf(full_sweep))
    for name in PLOTS:
        assert (out / name).is_file()


@pytest.mark.parametrize("extra,flag", [
    (["--exit_layers", "4"], "--exit_layers"), (["--exit_layers", "0:2"], "--exit_layers"),
    (["--exit_layers", "x"], "--exit_layers"), (["--gammas", "0"], "--gammas"),
    (["--temperatures", "-0.5"], "--temperatures"), (["--top_p", "0"], "--top_p"), (["--top_p", "1.5"], "--top_p"),
    (["--top_k", "-1"], "--top_k"), (["--draft_stop", "1"], "--draft_stop"), (["--draft_stop", "-0.2"], "--draft_stop"),
    (["--exit_ckpt", "MISSING"], "--exit_ckpt"),
    (["--exit_ckpt", "OTHER"], "--exit_ckpt"), (["--dataset", "nosuchset"], "--dataset"),
    (["--num_prompts", "0"], "--num_prompts"), (["--model", "./no/such/model"], "--model"),
    (["--max_new_tokens", "600"], "--max_new_tokens 600 plus the longest prompt's"),  # the tiny model has 512
    (["--tf_seq_len", "513"], "--tf_seq_len 513 is more than this model's limit of 512 positions"),
    (["--dataset", "BAD_LINES"], "--dataset: line 2 of"), (["--num_prompts", "5"], "--num_prompts 5: "),
    (["--tree_widths", "0"], "--tree_widths"), (["--tree_nodes", "-1"], "--tree_nodes"),
    (["--tree_widths", "2", "--engine", "hf"], "--tree_widths: trees of drafts need the lean engine"),
])
def test_bad_input_is_one_sentence_exit_2_and_writes_nothing(assets, tmp_path, capsys, extra, flag):
    extra = [{"MISSING": str(tmp_path / "missing"), "OTHER": str(assets / "other_exit"),
              "BAD_LINES": str(assets / "bad_prompts.jsonl")}.get(x, x) for x in extra]
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        evaluate.main(sweep_argv(assets, out) + extra)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert flag in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_cli_bad_value_without_traceback(assets, tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--top_p", "2", "--out_dir", str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--top_p" in done.stderr, done.stderr
    assert not (tmp_path / "o").exists()


def test_parse_layers_and_cells():
    assert parse_layers(["4:28:4"], 30) == [4, 8, 12, 16, 20, 24, 28]
    assert parse_layers(["3", "1:2", "3"], 5) == [1, 2, 3]
    assert parse_layers(None, 30) == [4, 8, 12, 16, 20, 24, 28] and parse_layers(None, 4) == [1, 2, 3]
    assert parse_layers([], 30) == []
    cells = make_cells([("untrained", 2)], [2, 4], [0.0, 0.7], [0.9, 1.0], [0])
    assert len(cells) == 2 * (1 + 2)  # greedy ignores top_p: kept once
    assert Cell("untrained", 2, 2, 0.0, 1.0, 0) in cells
    assert len(make_cells([("untrained", 2)], [2, 4], [0.0, 0.7], [0.9, 1.0], [0], [0.0, 0.2])) == 2 * 3 * 2
    # cells without a draft stop keep the ids they had before the field existed (so --resume finds old rows)
    context = {"exit_ids": {"untrained": "untrained"}, "model": "m", "prompts": {"": "h"}}
    old_key = {"exit": "untrained", "exit_layer": 2, "gamma": 2, "temperature": 0.0, "top_p": 1.0, "top_k": 0}
    old_id = hashlib.sha256(json.dumps({**old_key, **context, "prompts": "h", "exit_id": "untrained"},
                                       sort_keys=True).encode())
    assert evaluate.cell_id(Cell("untrained", 2, 2, 0.0, 1.0, 0), context) == old_id.hexdigest()[:16]
    assert evaluate.cell_id(Cell("untrained", 2, 2, 0.0, 1.0, 0, 0.2), context) != old_id.hexdigest()[:16]





def fake_row(exit, layer, gamma, temperature, speedup, matches, **kw):
    return {"cell_id": f"{exit}{layer}{gamma}{temperature}{kw}", "exit": exit, "exit_layer": layer, "gamma": gamma,
            "temperature": temperature, "top_p": 0.95 if temperature else 1.0, "top_k": 0, "draft_stop": 0.0,
            "speedup": speedup, "matches_baseline": matches, "prompts": 16, "max_new_tokens": 128, "alpha": 0.5,
            "c": 0.4, **kw}


def test_best_line_counts_only_lossless_cells(tmp_path, capsys):
    rows = [fake_row("untrained", 8, 1, 0.0, 1.9, False),  # fastest, but its greedy tokens differ: not counted
            fake_row("runs/speedup/exit_L6", 6, 2, 0.0, 1.31, True),
            fake_row("runs/speedup/exit_L6", 6, 4, 0.7, 1.254, None),
            fake_row("runs/speedup/exit_L6", 6, 4, 0.0, None, True)]
    assert best_line(rows) == ("best lossless speedup: 1.31x (exit_L6, L 6, gamma 2, width 1 (chain), greedy, "
                                        "16 prompts x 128 tokens)")
    rows.append(fake_row("runs/speedup/exit_L6", 6, 4, 0.7, 1.456, None, draft_stop=0.3))
    assert best_line(rows) == ("best lossless speedup: 1.46x (exit_L6, L 6, gamma 4, width 1 (chain), T=0.7, top_p=0.95, "
                                        "draft_stop 0.3, 16 prompts x 128 tokens)")
    assert best_line(rows[:1]).startswith("best lossless speedup: none")
    # from a results file, as `make speedup` prints it: one line, the last one
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (rows[0], rows[2], rows[3]))
                                            + '{"cell_id": "cut')
    evaluate.main(["--best_line", str(tmp_path)])
    out = capsys.readouterr().out
    assert out == ("best lossless speedup: 1.25x (exit_L6, L 6, gamma 4, width 1 (chain), T=0.7, top_p=0.95, 16 prompts "
                   "x 128 tokens)\n")
    rows.append(fake_row("runs/speedup/exit_L6", 6, 1, 0.7, 1.5, None, tree_width=4, tree_nodes=0))
    assert best_line(rows).startswith("best lossless speedup: 1.50x (exit_L6, L 6, gamma 1, width 4, nodes 4, T=0.7")
    rows[-1]["speedup_vs_generate"] = 2.1  # measured beside transformers' generate (--peer): said after the cell
    assert best_line(rows).endswith("16 prompts x 128 tokens); 2.10x over transformers' generate")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--best_line", str(tmp_path / "nothing")])
    assert e.value.code == 2 and "--best_line" in capsys.readouterr().err


def test_where_it_pays_map_is_written(tmp_path):
    rows = [fake_row("untrained", 8, g, t, 0.8, True, alpha=a, c=c) for g, t, a, c in
            ((1, 0.0, 0.2, 0.39), (2, 0.7, 0.5, 0.6), (4, 0.0, 0.8, 0.3), (3, 0.7, 0.7, 1.3))]
    plots.plot_where_it_pays(rows, tmp_path / "map.png", "tiny")
    plots.plot_where_it_pays([{**r, "v": 1.2} for r in rows], tmp_path / "map_v.png", "tiny")
    assert (tmp_path / "map.png").stat().st_size > 10_000 and (tmp_path / "map_v.png").stat().st_size > 10_000


def test_sweep_with_a_pruned_head_and_adaptive_draft_length(assets, tmp_path, capsys):
    """--exit_ckpt takes a pruned-head checkpoint; --draft_stop is one more axis of the grid; the sweep ends with
    the best line."""
    out = tmp_path / "stops"
    evaluate.main(["--model", str(assets / "model"), "--dataset", str(assets / "prompts.jsonl"), "--exit_layers",
                   "--exit_ckpt", str(assets / "pruned_L2"), "--gammas", "3", "--temperatures", "0", "1.0",
                   "--draft_stop", "0", "0.12", "--num_prompts", "2", "--max_new_tokens", "12", "--tf_blocks", "2",
                   "--tf_seq_len", "32", "--dtype", "float32", "--out_dir", str(out)])
    assert capsys.readouterr().out.splitlines()[-1].startswith("best lossless speedup: ")
    rows = read_rows(out / "results.jsonl")
    assert [(r["temperature"], r["draft_stop"]) for r in rows] == [(0.0, 0.0), (0.0, 0.12), (1.0, 0.0), (1.0, 0.12)]
    for r in rows:
        assert sum(r["draft_len_hist"]) == r["target_calls"] and r["drafted"] <= 3 * r["target_calls"]
        assert r["accepted"] + r["target_calls"] == r["new_tokens"] == 2 * 12
        assert r["predicted_speedup"] == pytest.approx(predicted_speedup(r["alpha"], 3, r["c"], r["draft_len_hist"],
                                                                         r["v"]))
        assert r["matches_baseline"] is (True if r["temperature"] == 0 else None)
    assert rows[1]["avg_draft_len"] < rows[0]["avg_draft_len"] and rows[3]["avg_draft_len"] < rows[2]["avg_draft_len"]
    assert len({r["cell_id"] for r in rows}) == 4
    # the pruned exit's teacher-forced metrics are finite and measured against the full teacher
    tf = [json.loads(line) for line in (out / "layer_sweep.jsonl").read_text().splitlines()]
    pruned = [r for r in tf if r["exit"] != "untrained"][0]
    assert 0 < pruned["vocab_mass"] < 1 and math.isfinite(pruned["kl"]) and math.isfinite(pruned["exit_ppl"])
    assert all(r["vocab_mass"] == pytest.approx(1.0) for r in tf if r["exit"] == "untrained")
    assert (out / "where_it_pays.png").stat().st_size > 0 and "stop 0.12" in (out / "summary.md").read_text()


def test_paired_baseline_gives_the_same_cells_with_their_own_baselines(assets, full_sweep, tmp_path):
    """--paired_baseline: each cell times its own autoregressive runs, prompt by prompt in turns with its own; the
    numbers that do not depend on time are those of the plain sweep, under other cell ids."""
    out = tmp_path / "paired"
    evaluate.main(sweep_argv(assets, out, "--paired_baseline"))
    plain, paired = read_rows(full_sweep / "results.jsonl"), read_rows(out / "results.jsonl")
    drop = ("cell_id", "paired_baseline", "draft_step_ms", "full_step_ms", "c", "v", "predicted_speedup")
    assert_same_rows([{k: v for k, v in r.items() if k not in drop} for r in plain],
                     [{k: v for k, v in r.items() if k not in drop} for r in paired])
    assert all(r["paired_baseline"] for r in paired) and not any(r["paired_baseline"] for r in plain)
    assert len({r["baseline_seconds"] for r in paired}) == len(paired)  # timed per cell, not shared
    assert not {r["cell_id"] for r in plain} & {r["cell_id"] for r in paired}



def test_prompt_file_takes_the_turns_before_the_last_reply(tmp_path):
    tok = make_tiny_tokenizer()
    path = tmp_path / "p.jsonl"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"}]
    path.write_text(json.dumps({"messages": msgs}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    prompts, blocks = data_utils.load_prompt_file(path, tok, 2, 100, 8, blocks=2)
    render = lambda turns: tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert [p["text"] for p in prompts] == [render(msgs[:3]), render([{"role": "user", "content": "x"}])]
    assert len(blocks) == 2 and all(len(b["input_ids"]) == 8 for b in blocks)
    # --tf_blocks N takes N blocks, as for the built-in datasets; 0 takes none (the file's text is not even packed)
    assert data_utils.load_prompt_file(path, tok, 2, 100, 8)[1] == []
    assert len(data_utils.load_prompt_file(path, tok, 2, 100, 8, blocks=1)[1]) == 1


def test_prompt_file_is_read_strictly_and_gives_the_prompts_asked_for(tmp_path, caplog):
    tok = make_tiny_tokenizer()
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": ""}\n{"prompt": "b"}\n{"messages": "c"}\n{bad\n{"prompt": "d"}\n')
    with pytest.raises(DataError, match=r"^--dataset: line 5 of .*p\.jsonl is not valid JSON"):
        data_utils.load_prompt_file(path, tok, 2, 100, 8)
    path.write_text('{"prompt": "a"}\n{"prompt": ""}\n{"prompt": "b"}\n')
    with pytest.raises(DataError, match=r'^--dataset: line 2 of .*p\.jsonl has no usable prompt \(a non-empty '
                                                 r'"prompt" string, or "messages": a list of \{"role", "content"\} '
                                                 r'strings\); fix it, or pass --skip_bad_lines to skip such entries\.$'):
        data_utils.load_prompt_file(path, tok, 2, 100, 8)
    with caplog.at_level("INFO", logger="data_utils"):
        prompts, _ = data_utils.load_prompt_file(path, tok, 2, 100, 8, skip_bad_lines=True)
    render = lambda text: tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,  # noqa: E731
                                                  add_generation_prompt=True)
    assert [p["text"] for p in prompts] == [render("a"), render("b")]
    assert f"skipped 1 bad entry (--skip_bad_lines): line 2 of {path}" in caplog.text
    with pytest.raises(DataError, match=r"^--num_prompts 3: .*p\.jsonl has only 2 prompts of at most 100 "
                                                 r"tokens \(--max_prompt_tokens\); ask for fewer prompts or change "
                                                 r"--max_prompt_tokens\.$"):
        data_utils.load_prompt_file(path, tok, 3, 100, 8, skip_bad_lines=True)


def test_sigterm_mid_sweep_keeps_the_finished_cells_and_resumes_each_cell_once(assets, full_sweep, capsys,
                                                                               monkeypatch):
    """SIGTERM while the 6th cell runs: that cell is dropped, the 5 before it stay, one line says so and gives the
    command that finishes the sweep; exit status 143. The resumed sweep has every cell once, as an uninterrupted one."""
    import os
    import shlex
    import signal

    import cli
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = assets / "sigterm"
    calls, real_run_cell = [], evaluate.run_cell

    def run_cell(*a, **k):
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_run_cell(*a, **k)
    monkeypatch.setattr(evaluate, "run_cell", run_cell)
    with pytest.raises(SystemExit) as e:
        evaluate.main(sweep_argv(assets, out))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 143
    python = cli._program(sys.executable, "python")
    assert line.startswith(f"evaluate.py: stopped by SIGTERM; kept 5 of 12 cells in {out} (the cell in progress is "
                           f"dropped); continue with: {python} evaluate.py --model "), line
    assert len(read_rows(out / "results.jsonl")) == 5
    monkeypatch.setattr(evaluate, "run_cell", real_run_cell)
    argv = shlex.split(line.split("continue with: ", 1)[1])
    assert argv[:2] == [python, "evaluate.py"] and argv[-1] == "--resume"
    evaluate.main(argv[2:])
    rows = read_rows(out / "results.jsonl")
    assert len((out / "results.jsonl").read_text().splitlines()) == len({r["cell_id"] for r in rows}) == 12
    assert_same_rows(rows, read_rows(full_sweep / "results.jsonl"))


def test_sweep_with_trees_of_drafts(assets, tmp_path, capsys):
    """--tree_widths and --tree_nodes are grid dimensions; tree rows carry their width, nodes, tokens per cycle,
    acceptance per depth, v for their size and the tree's predicted speedup; greedy trees match the baseline."""
    out = tmp_path / "trees"
    evaluate.main(["--model", str(assets / "model"), "--dataset", str(assets / "prompts.jsonl"), "--exit_layers", "2",
                   "--gammas", "1", "2", "--temperatures", "0", "1.0", "--tree_widths", "1", "3", "--tree_nodes", "0",
                   "4", "--num_prompts", "2", "--max_new_tokens", "12", "--tf_blocks", "0", "--dtype", "float32",
                   "--out_dir", str(out)])
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("best lossless speedup: ") and ", width " in last
    rows = read_rows(out / "results.jsonl")
    trees = sorted({(r["gamma"], r["tree_width"], r["tree_nodes"]) for r in rows})
    # a chain has no budget; width 3 at gamma 1 has the default budget 3, so --tree_nodes 4 is a cell of its own
    assert trees == [(1, 1, 0), (1, 3, 0), (1, 3, 4), (2, 1, 0), (2, 3, 0), (2, 3, 4)]
    assert len({r["cell_id"] for r in rows}) == len(rows) == 12
    for r in rows:
        assert r["tokens_per_cycle"] == pytest.approx(r["new_tokens"] / r["target_calls"])
        assert len(r["accept_by_depth"]) == r["gamma"] and r["accepted"] + r["target_calls"] == r["new_tokens"]
        assert r["matches_baseline"] is (True if r["temperature"] == 0 else None)
        if r["tree_width"] > 1:
            assert r["avg_draft_len"] <= (r["tree_nodes"] or 3 * r["gamma"]) and r["v"] >= 0.5
            rows_hist = r["draft_rows_hist"]
            assert sum(rows_hist) >= r["target_calls"] - 2 and len(rows_hist) <= 4  # a last cycle may draft nothing
            assert r["predicted_speedup"] > 0 and "tree 3x" in (out / "summary.md").read_text()
        else:
            assert r["predicted_speedup"] == pytest.approx(predicted_speedup(r["alpha"], r["gamma"], r["c"],
                                                                             r["draft_len_hist"], r["v"]))
    assert (out / "speed_vs_width.png").stat().st_size > 10_000



def test_draft_sources_and_prompt_sets_are_grid_dimensions():
    exits = [("untrained", 1), ("ckpt", 2)]
    cells = make_cells(exits, [1, 4], [0.0], [0.95], [0], drafts=("exit", "lookup", "exit+lookup"),
                       lookup_tokens=(0, 4), prompt_sets=("a", "b"))
    lookup = [c for c in cells if c.draft == "lookup"]
    assert {(c.exit, c.exit_layer) for c in lookup} == {("none", 0)}  # once, not per exit
    assert sorted((c.prompt_set, c.gamma) for c in lookup) == [("a", 1), ("a", 4), ("b", 1), ("b", 4)]
    assert all(c.lookup_tokens == 0 and c.tree_width == 1 for c in lookup)  # gamma is the lookup's length
    hybrid = [c for c in cells if c.draft == "exit+lookup"]
    # lookup_tokens 4 at gamma 4 is the default (0: gamma), kept once
    assert sorted({(c.gamma, c.lookup_tokens) for c in hybrid}) == [(1, 0), (1, 4), (4, 0)]
    assert len(hybrid) == 2 * 2 * 3 and all(c.exit != "none" for c in hybrid)
    assert all(c.lookup_tokens == 0 for c in cells if c.draft == "exit")
    context = {"model": "m", "exit_ids": {"untrained": "u", "ckpt": "k"}, "prompts": {"a": "ha", "b": "hb"}}
    ids = [evaluate.cell_id(c, context) for c in cells]
    assert len(set(ids)) == len(cells)
    old = Cell("untrained", 1, 2, 0.0, 1.0, 0)  # a cell of a sweep made before draft sources: the same id as before
    assert evaluate.cell_id(old, {"exit_ids": {"untrained": "u"}, "prompts": {"": "h"}}) == evaluate.cell_id(
        Cell("untrained", 1, 2, 0.0, 1.0, 0, 0.0, 1, 0, "exit", 0, 3, ""), {"exit_ids": {"untrained": "u"},
                                                                             "prompts": {"": "h"}})


def test_sweep_with_recycled_and_auto_drafts(assets, tmp_path, capsys):
    """--drafts recycle auto: recycled cells once (no exit), auto cells per exit; rows carry tokens by source and
    auto's choices (one per cycle); greedy cells equal the baseline; both labelled in the table."""
    out = tmp_path / "auto"
    evaluate.main(["--model", str(assets / "model"), "--dataset", str(assets / "prompts.jsonl"),
                   "--exit_ckpt", str(assets / "exit_L2"), "--exit_layers", "--drafts", "recycle", "auto",
                   "--gammas", "2", "--tree_widths", "2", "--temperatures", "0", "1.0", "--num_prompts", "2",
                   "--max_new_tokens", "16", "--tf_blocks", "0", "--dtype", "float32", "--out_dir", str(out)])
    assert capsys.readouterr().out.splitlines()[-1].startswith("best lossless speedup: ")
    rows = read_rows(out / "results.jsonl")
    assert sorted(r["draft"] for r in rows) == ["auto", "auto", "recycle", "recycle"]
    for r in rows:
        assert sum(r["tokens_by_source"].values()) == r["new_tokens"]
        assert r["matches_baseline"] is (True if r["temperature"] == 0 else None)
        if r["draft"] == "recycle":
            assert r["exit"] == "none" and r["tokens_by_source"]["exit"] == r["tokens_by_source"]["lookup"] == 0
        else:
            assert r["exit"] != "none" and sum(r["auto_choices"].values()) == r["target_calls"]
    summary = (out / "summary.md").read_text()
    assert "| recycled |" in summary and "| auto: exit_L2 L2 |" in summary


def test_sweep_with_lookup_and_two_prompt_sets(assets, tmp_path, capsys):
    """--drafts exit lookup exit+lookup over two prompt sets: lookup cells once per set (no exit; widths: its branches),
    rows carrying the source, match rate, tokens by source and the lookup's c; a table, plots and a best line per set;
    greedy cells equal the baseline."""
    out = tmp_path / "lookup"
    second = tmp_path / "more.jsonl"
    second.write_text("".join(json.dumps({"prompt": f"Repeat after me: {w} {w} {w} {w}."}) + "\n"
                              for w in ("abc", "xyz", "sea")))
    evaluate.main(["--model", str(assets / "model"), "--dataset", str(assets / "prompts.jsonl"), str(second),
                   "--exit_ckpt", str(assets / "exit_L2"), "--exit_layers", "--drafts", "exit", "lookup",
                   "exit+lookup", "--gammas", "1", "3", "--lookup_tokens", "3", "--tree_widths", "1", "2",
                   "--temperatures", "0", "1.0", "--num_prompts", "2", "--max_new_tokens", "16", "--tf_blocks", "0",
                   "--dtype", "float32", "--out_dir", str(out)])
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("best lossless speedup: ") and ".jsonl); " in last and last.endswith(" over transformers' generate")
    rows = read_rows(out / "results.jsonl")
    sets = {r["prompt_set"] for r in rows}
    assert sets == {str(assets / "prompts.jsonl"), str(second)}
    lookup = [r for r in rows if r["draft"] == "lookup"]
    assert len(lookup) == 2 * 2 * 2 * 2 and all(r["exit"] == "none" for r in lookup)  # chains and trees of branches
    assert {r["tree_width"] for r in lookup} == {1, 2} and all(r["tree_nodes"] == 0 for r in lookup)
    for r in rows:
        assert sum(r["tokens_by_source"].values()) == r["new_tokens"]
        assert r["matches_baseline"] is (True if r["temperature"] == 0 else None)
        assert r["predicted_speedup"] > 0 and r["tokens_per_cycle"] == pytest.approx(r["new_tokens"] / r["target_calls"])
        if r["draft"] == "exit":
            assert r["lookup_match_rate"] is None and r["tokens_by_source"]["lookup"] == 0
        else:
            assert 0 <= r["lookup_match_rate"] <= 1 and 0 <= r["c_lookup"] < r["c"]
        if r["draft"] == "lookup":
            assert r["tokens_by_source"]["exit"] == 0
    assert sum(r["tokens_by_source"]["lookup"] for r in rows if r["prompt_set"] == str(second)) > 0
    summary = (out / "summary.md").read_text()
    assert summary.count("best lossless speedup") == 2 and "| lookup |" in summary and "+ lookup" in summary
    for folder in ("prompts", "more"):
        assert (out / folder / "where_it_pays.png").stat().st_size > 10_000


# ----------------------------------------------------------------------------------------------------------------
# Several processes: cells split by cost, the teacher-forced sweep shared


def loads(costs, parts):
    return [sum(costs[i] for i in p) for p in parts]


def test_split_cells_is_balanced_and_covers_every_cell_once():
    assert evaluate.split_cells([3, 3, 2, 2, 2], 2) == [[0, 2, 4], [1, 3]]  # the textbook case: 7 where 6 is best
    rng = random.Random(0)
    for _ in range(20):
        world = rng.randint(2, 3)
        costs = [rng.randint(1, 20) for _ in range(rng.randint(world, 8))]
        parts = evaluate.split_cells(costs, world)
        assert sorted(i for p in parts for i in p) == list(range(len(costs))) and all(p == sorted(p) for p in parts)
        best = min(max(loads(costs, [[i for i, r in enumerate((0,) + who) if r == k] for k in range(world)]))
                   for who in itertools.product(range(world), repeat=len(costs) - 1))  # cell 0 on process 0
        assert max(loads(costs, parts)) <= 4 / 3 * best
        assert evaluate.split_cells(costs, world) == parts  # the same on every process


def test_a_sweeps_cells_split_by_cost_beat_round_robin():
    exits = [("untrained", L) for L in (2, 8, 15, 22, 28)]
    cells = make_cells(exits, [1, 2, 4, 8, 16], [0.0, 0.7], [0.95], [0], tree_widths=(1, 3), drafts=("exit", "lookup"))
    costs = [evaluate.cell_cost(c, 30) for c in cells]
    assert min(costs) > 0 and max(costs) > 1.5 * min(costs)  # they differ: the split matters
    for world in (2, 3, 4, 8):
        parts = evaluate.split_cells(costs, world)
        assert sorted(i for p in parts for i in p) == list(range(len(cells)))
        bound = max(sum(costs) / world, max(costs))  # no split does better
        assert max(loads(costs, parts)) <= 1.05 * bound
        assert max(loads(costs, parts)) <= max(loads(costs, [list(range(len(cells)))[r::world]
                                                             for r in range(world)]))
    assert evaluate.cell_cost(cells[0], 30, baseline=1.0) == pytest.approx(costs[0] + 1.0)


def test_teacher_forced_sweep_shared_by_processes_gives_the_one_process_rows(assets):
    base, _ = load_base_model(str(assets / "model"))
    g = torch.Generator().manual_seed(0)
    blocks = [{"input_ids": torch.randint(0, 259, (n,), generator=g).tolist()} for n in (12, 9, 16, 7, 11)]
    sweep = lambda **k: evaluate.layer_sweep(base, [], blocks, [0.0, 0.5], 2, 0, **k)
    one = sweep()
    parts = []
    for rank in range(3):  # three processes, one batch each: every part as its process computes it
        sweep(rank=rank, world=3, gather=lambda mine: parts.extend(mine) or mine)
    shared = sweep(rank=1, world=3, gather=lambda mine: parts[::-1])  # gathered in any order
    assert shared == one and len(one) == 3 and "overlap_t0.5" in one[0]


def test_sweep_over_the_fields_question_file_makes_one_prompt_set_per_task(assets, tmp_path, capsys):
    """--dataset question.jsonl (Spec-Bench's schema): one prompt set per task (MT-bench's categories together as
    conversation), named PATH:TASK in the rows, each with its own plot folder; PATH:TASK alone takes one set."""
    q = tmp_path / "question.jsonl"
    records = [("writing", "Write a short poem about rain."), ("coding", "Write a function that adds two numbers."),
               ("rag", "Using the text: the sea is blue. What colour is the sea?"),
               ("rag", "Using the text: grass is green. What colour is grass?")]
    q.write_text("".join(json.dumps({"question_id": i, "category": c, "turns": [t, "And then?"]}) + "\n"
                         for i, (c, t) in enumerate(records)))
    out = tmp_path / "q"
    argv = ["--model", str(assets / "model"), "--exit_ckpt", str(assets / "exit_L2"), "--exit_layers", "--drafts",
            "lookup", "--gammas", "2", "--temperatures", "0", "--num_prompts", "2", "--max_new_tokens", "8",
            "--tf_blocks", "0", "--dtype", "float32", "--no-peer"]
    evaluate.main(argv + ["--dataset", str(q), "--out_dir", str(out)])
    rows = read_rows(out / "results.jsonl")
    assert [r["prompt_set"] for r in rows] == [f"{q}:conversation", f"{q}:rag"]
    assert (out / "question_conversation" / "speed_vs_gamma.png").is_file() and (out / "question_rag" / "speed_vs_gamma.png").is_file()
    capsys.readouterr()
    evaluate.main(argv + ["--dataset", f"{q}:rag", "--out_dir", str(tmp_path / "one")])
    one = read_rows(tmp_path / "one" / "results.jsonl")  # one set: the sweep's own dataset
    assert [(r["prompt_set"], r["dataset"]) for r in one] == [("", f"{q}:rag")]
