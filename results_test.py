"""The sweep's results (results.py): the cost model, the results files."""
import itertools
import json

import pytest

import results
from results import interval, merge_results, predicted_speedup, read_rows, with_interval


def test_predicted_speedup_formula():
    assert predicted_speedup(0.0, 4, 0.5) == pytest.approx(1 / 3)
    assert predicted_speedup(1.0, 4, 0.25) == pytest.approx(5 / 2)
    assert predicted_speedup(0.5, 2, 0.0) == pytest.approx(1.75)
    assert predicted_speedup(None, 2, 0.5) is None
    # realised draft lengths: every cycle at gamma is the plain formula; otherwise tokens are averaged over the
    # lengths and the cost uses their mean
    assert predicted_speedup(0.6, 3, 0.4, [0, 0, 0, 7]) == pytest.approx(predicted_speedup(0.6, 3, 0.4))
    tokens = (1 + (1 + 0.5 + 0.25 + 0.125)) / 2  # one cycle of 0 drafts, one of 3
    assert predicted_speedup(0.5, 3, 0.2, [1, 0, 0, 1]) == pytest.approx(tokens / (1.5 * 0.2 + 1))
    assert predicted_speedup(0.5, 3, 0.2, [2, 0, 0, 0]) == pytest.approx(1.0)  # nothing drafted: autoregressive
    assert predicted_speedup(0.5, 2, 0.5, v=1.5) == pytest.approx(1.75 / 2.5)


def test_break_even_curves_give_a_predicted_speedup_of_one():
    for a, g, v in itertools.product((0.3, 0.6, 0.9), (1, 2, 4), (1.0, 1.3)):
        c = results.break_even_c(a, g, v)
        assert predicted_speedup(a, g, c, v=v) == pytest.approx(1.0)
        assert predicted_speedup(a, g, c - 0.01, v=v) > 1 > predicted_speedup(a, g, c + 0.01, v=v)


def test_merge_keeps_each_cell_once_in_cell_order(tmp_path):
    row = lambda cid, v: {"cell_id": cid, "v": v}
    (tmp_path / "results.jsonl").write_text(json.dumps(row("b", 1)) + "\n" + '{"cell_id": "c", "v"')
    (tmp_path / "results.rank0.jsonl").write_text(json.dumps(row("a", 2)) + "\n" + json.dumps(row("b", 3)) + "\n")
    (tmp_path / "results.rank1.jsonl").write_text(json.dumps(row("c", 4)) + "\n" + json.dumps(row("z", 5)) + "\n")
    rows = merge_results(tmp_path, ["a", "b", "c"])
    assert rows == [row("a", 2), row("b", 1), row("c", 4)]
    assert read_rows(tmp_path / "results.jsonl") == rows + [row("z", 5)]  # another sweep's row is kept, last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]


def test_read_results_holds_each_cell_once(tmp_path):
    row = lambda cid, v: {"cell_id": cid, "v": v}
    (tmp_path / "results.jsonl").write_text(json.dumps(row("b", 1)) + "\n" + '{"cell_id": "c", "v"')
    (tmp_path / "results.rank0.jsonl").write_text(json.dumps(row("a", 2)) + "\n" + json.dumps(row("b", 3)) + "\n")
    assert results.read_results(tmp_path) == [row("b", 1), row("a", 2)]  # results.jsonl's row of b; the cut line
    assert results.read_results(tmp_path / "none") == []


def test_the_interval_pairs_each_prompt_with_its_own_baseline():
    # every prompt exactly 1.5x over its own baseline, the prompts' speeds far apart: a paired resample cannot move
    # the speedup, an unpaired one would
    each = [[100, 100 / (1.5 * v), 40, 100, 100 / v] for v in (5.0, 20.0, 80.0, 10.0)]
    assert interval({"per_prompt": each}) == pytest.approx((1.5, 1.5))
    # one prompt 3x, three 1x: the interval spans them and holds the pooled figure
    each = [[100, 1.0 / s, 50, 100, 1.0] for s in (3.0, 1.0, 1.0, 1.0)]
    lo, hi = interval({"per_prompt": each})
    pooled = (400 / sum(x[1] for x in each)) / 100
    assert 1.0 <= lo < pooled < hi <= 3.0
    assert interval({"per_prompt": each}, "tokens_per_call") == pytest.approx((2.0, 2.0))
    assert interval({"per_prompt": each[:1]}) is None and interval({}) is None
    assert with_interval({"speedup": pooled, "per_prompt": each}).startswith(f"{pooled:.2f} [")
