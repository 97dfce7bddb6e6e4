"""benchmark_torch_compile: the benchmarks run and print their side-by-side ratios (the static and compiled steps they
time are tested in decode_engine_test.py)."""
import pytest
import torch

import benchmark_torch_compile as btc
from train_test import tiny_dir  # noqa: F401  (fixture)


@pytest.mark.parametrize("vocab", ["0", "100"])
def test_benchmark_prints_a_side_by_side_ratio(tiny_dir, capsys, vocab):
    ratio = btc.main(["--model", str(tiny_dir), "--exit_layer", "3", "--batch_size", "2", "--seq_len", "16",
                      "--train_step", "--draft_vocab", vocab, "--dtype", "float32"])
    out = capsys.readouterr().out
    assert ratio > 0 and f"ratio {ratio:.2f} (median of 5 side-by-side pairs" in out


def test_exits_benchmark_times_a_shared_pass_against_separate_runs(tiny_dir, capsys):
    res = btc.main(["--model", str(tiny_dir), "--batch_size", "2", "--seq_len", "16", "--exits", "1", "3",
                    "--draft_vocab", "64", "--dtype", "float32"])
    out = capsys.readouterr().out.splitlines()
    assert sorted(res) == [1, 3] and all(t > 0 and s > 0 for t, s in res.values())
    assert out[0].startswith("1 exit(s) at layers 2: one shared base pass") and \
        out[1].startswith("3 exit(s) at layers 2, 3, 4: one shared base pass") and "3 separate runs" in out[1]


def test_random_model_is_the_named_shape_seeded_and_made_in_its_dtype():
    a, b = (btc.random_model("tiny", "cpu", torch.bfloat16, seed=1) for _ in range(2))
    c = btc.random_model("tiny", torch.device("cpu"), torch.bfloat16, seed=2)
    assert {p.dtype for p in a.parameters()} == {torch.bfloat16} and a.model.rotary_emb.inv_freq.dtype == torch.float32
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a.config.num_hidden_layers == 4 and a.lm_head.weight is a.model.embed_tokens.weight
    for name, (layers, hidden, heads, kv, vocab, tied) in {
            "smollm2-135m": (30, 576, 9, 3, 49152, True), "llama-3.2-1b": (16, 2048, 32, 8, 128256, True),
            "llama-3.1-8b": (32, 4096, 32, 8, 128256, False)}.items():
        m = btc.random_model(name, "meta", torch.bfloat16)  # the real shapes, without their memory
        assert {p.device.type for p in m.parameters()} == {"meta"}  # made where asked, never on the CPU first
        cfg = m.config
        assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                cfg.vocab_size, cfg.tie_word_embeddings) == (layers, hidden, heads, kv, vocab, tied), name
        assert (m.lm_head.weight is m.model.embed_tokens.weight) == tied
        if name.startswith("llama"):
            assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["rope_theta"] == 500000.0
            assert cfg.rope_parameters["factor"] == (32.0 if name == "llama-3.2-1b" else 8.0)
    assert torch.get_default_dtype() == torch.float32


def test_random_weights_download_nothing_and_time_a_layer_that_fits(monkeypatch, capsys):
    def refuse(*a, **k):
        raise AssertionError("--random_weights must not load a model or a dataset")

    monkeypatch.setattr(btc, "load_base_model", refuse)
    monkeypatch.setattr(btc, "sharegpt_prompts", refuse)
    monkeypatch.setattr("truncated_llama.resolve_model_path", refuse)
    monkeypatch.setattr("share_gpt_dataset.load_splits", refuse)
    monkeypatch.setattr(btc, "rooflines", lambda model, device: {"physical_tok_s": 1.0, "products_tok_s": 1.0})
    report = btc.main(["--random_weights", "--shape", "tiny", "--device", "cpu", "--dtype", "float32",
                       "--num_prompts", "1", "--max_new_tokens", "4", "--gammas", "2"])
    out = capsys.readouterr().out
    assert out.startswith("random tiny weights: 1 random prompts x 4 new tokens, greedy, cpu/float32")
    (part,) = report
    assert [r["exit_layer"] for r in part["speed"]] == [btc.default_layer(4)] == [3]
    assert part["speed"][0]["ours_spec_equal_to_ours_ar"] == "1/1" and "c_L3" in part["steps"]["lean"]
    assert [btc.default_layer(n) for n in (2, 16, 30, 32)] == [1, 11, 20, 21]


@pytest.mark.parametrize("extra,says", [
    (["--layers", "20"], "--layers: layer 20 is outside 1..3 for this 4-layer model."),
    (["--layers", "2", "--check_layers", "0"], "--check_layers: layer 0 is outside 1..3 for this 4-layer model."),
    (["--shape", "huge"], "argument --shape: invalid choice: 'huge'"),
    (["--model", "some/model", "--shape", None], "--random_weights: give --shape (one of tiny, smollm2-135m"),
    (["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
])
def test_bad_random_weights_flags_are_one_sentence_exit_2(monkeypatch, capsys, extra, says):
    monkeypatch.setattr(btc, "random_model", lambda *a, **k: pytest.fail("checked before the model is made"))
    argv = ["--random_weights", "--shape", "tiny", "--device", "cpu"] + extra
    if None in argv:  # no --shape at all
        argv = [a for a in argv if a not in ("--shape", "tiny", None)]
    with pytest.raises(SystemExit) as e:
        btc.run_command("benchmark_torch_compile.py", argv, lambda stop: btc.main(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith(f"benchmark_torch_compile.py: error: {says}"), err
    assert len(err.splitlines()) == 1


def test_versus_times_this_checkout_against_another_side_by_side(tiny_dir, monkeypatch):
    """--versus DIR: both sides in their own processes, every generation in turns; against itself, every run's tokens
    are identical and both sides report a speed."""
    from pathlib import Path
    monkeypatch.setattr(btc, "VERSUS_RUNS", {k: btc.VERSUS_RUNS[k] for k in ("autoregressive", "exit_L3_T0.7_g2")})
    monkeypatch.setattr(btc, "sharegpt_prompts", lambda tok, n, seed: [torch.tensor([[5, 17, 5, 17, 40, 5, 9]])] * n)
    report = btc.main(["--model", str(tiny_dir), "--versus", str(Path(btc.__file__).parent), "--num_prompts", "2",
                       "--max_new_tokens", "8", "--dtype", "float32"])
    runs = report[0]["runs"]
    assert set(runs) == {"autoregressive", "exit_L3_T0.7_g2"}
    assert all(r["identical"] == "4/4" and r["this_tok_s"] > 0 and r["versus_tok_s"] > 0 for r in runs.values())


def test_versus_a_directory_that_is_no_checkout_is_one_sentence(tmp_path, capsys):
    with pytest.raises(btc.UsageError, match=r"^--versus: .* is not a checkout of this repository"):
        btc.main(["--versus", str(tmp_path / "nowhere")])


def test_a_compilation_inside_a_timed_region_fails_the_benchmark():
    import torch

    from benchmark_torch_compile import NoCompileInside, RecompiledInside
    f = torch.compile(lambda x: x * 2 + 1, backend="eager", dynamic=False)
    f(torch.ones(3))  # compiled before timing
    with NoCompileInside("warm"):
        f(torch.ones(3))  # a replay: nothing compiled
    with pytest.raises(RecompiledInside, match=r"^a new shape: torch.compile compiled 1 graph\(s\) inside"):
        with NoCompileInside("a new shape"):
            f(torch.ones(5))  # another static shape: a recompilation


def test_prefill_peak_reports_both_ways_and_only_one_makes_logits():
    import torch

    from benchmark_torch_compile import prefill_peak, random_model
    model = random_model("tiny", "cpu", torch.float32)
    with_logits = prefill_peak(model, 300, torch.device("cpu"), True)
    layers = prefill_peak(model, 300, torch.device("cpu"), False)
    assert with_logits["logits_gib"] == round(299 * 512 * 4 / 2**30, 3) and layers["logits_gib"] is None
    assert with_logits["prefill_tokens"] == layers["prefill_tokens"] == 299
    assert with_logits["peak_gib"] >= 0 and layers["peak_gib"] >= 0 and layers["dtype"] == "float32"
