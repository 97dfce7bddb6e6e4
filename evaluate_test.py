"""The self-speculative loop: lossless (greedy and sampling, also with a pruned draft head and an adaptive draft
length), stats, EOS, bad values; the sweep."""
import itertools

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import evaluate
import plots
from conftest import make_tiny_llama
from evaluate import Policy, autoregressive_generate, speculative_generate
from truncated_llama import TruncatedLlama
from tuned_llama import EarlyExit


def perturbed_exit(base, layer, seed=1, **kw):
    """An exit with adapters whose weights are randomised, so the draft really differs from the untrained one."""
    exit = EarlyExit(base, layer, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in exit.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return exit


@pytest.mark.parametrize("tie", [False, True])
def test_greedy_equals_autoregressive_and_generate(tie):
    base = make_tiny_llama(layers=6, init_std=0.2, tie=tie, seed=3)
    prompt = torch.randint(0, 259, (1, 9), generator=torch.Generator().manual_seed(0))
    new = 24
    ref = base.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)[0, prompt.shape[1]:]
    stopped_early = 0
    for layer in (1, 3, 5):
        tl = TruncatedLlama(base, layer)
        ar, _ = autoregressive_generate(tl, prompt, new)
        assert torch.equal(ar, ref)
        for gamma, stop in itertools.product((1, 2, 4, 7, 100), (0.0, 0.06)):  # 100 > max_new_tokens
            sp, stats = speculative_generate(tl, prompt, new, gamma=gamma, draft_stop=stop)
            assert torch.equal(sp, ref), (layer, gamma, stop)
            assert stats["cache_positions"] == [prompt.shape[1] + new - 1] * 6  # exactly the committed tokens
            caps = cycle_caps(stats["per_cycle"], gamma, new)
            assert all(d <= cap for d, cap in zip(stats["per_cycle_drafted"], caps))
            if not stop:
                assert stats["per_cycle_drafted"] == caps
            stopped_early += sum(d < cap for d, cap in zip(stats["per_cycle_drafted"], caps))
    assert stopped_early > 10  # the adaptive stop really cut drafts short


def cycle_caps(per_cycle, gamma, max_new_tokens):
    """The draft length of each cycle without an adaptive stop: min(gamma, tokens still needed - 1)."""
    caps, n = [], 0
    for k in per_cycle:
        caps.append(min(gamma, max_new_tokens - n - 1))
        n += k + 1
    return caps


PRUNED = torch.arange(0, 259, 3)  # a pruned draft head's vocabulary: every third token


@pytest.mark.parametrize("kw", [dict(adapter="block"), dict(adapter="mlp"), dict(last_block=True),
                                dict(last_block=True, adapter="block"), dict(vocab=PRUNED),
                                dict(adapter="block", vocab=PRUNED)])
def test_greedy_lossless_with_trained_looking_exits(kw):
    base = make_tiny_llama(layers=5, init_std=0.2, seed=4)
    prompt = torch.randint(0, 259, (1, 6), generator=torch.Generator().manual_seed(1))
    tl = TruncatedLlama(base, 3, perturbed_exit(base, 3, **kw))
    ar, _ = autoregressive_generate(tl, prompt, 30)
    for gamma, stop in ((1, 0.0), (3, 0.0), (6, 0.0), (6, 0.05)):
        sp, stats = speculative_generate(tl, prompt, 30, gamma=gamma, draft_stop=stop)
        assert torch.equal(sp, ar), (kw, gamma, stop)
        assert stats["drafted"] > 0
    if "vocab" in kw:  # the pruned draft only ever proposes its own tokens
        with torch.no_grad():
            q = tl(prompt).exit_logits
        assert torch.isinf(q[..., [t for t in range(259) if t not in set(PRUNED.tolist())]]).all()
        assert torch.isfinite(q[..., PRUNED]).all()
        drafted = [int(t) for t, d in zip(sp, stats["from_draft"]) if d]
        assert drafted and set(drafted) <= set(PRUNED.tolist())


# ---------------------------------------------------------------------------------------------------------------
# Sampling is exact: the first two generated tokens follow the target's distribution, by enumeration.

VOCAB = 5
SAMPLES = 1500


def exact_distribution(base, prompt, policy, length=3):
    """P(x1..x_length) under the full model and the policy, by enumerating every prefix (VOCAB ** length cells)."""
    probs = torch.ones(1, dtype=torch.float64)
    seqs = prompt
    with torch.no_grad():
        for _ in range(length):
            p = policy.probs(base(seqs).logits[:, -1]).double()  # (#prefixes, V)
            probs = (probs.view(-1, 1) * p).reshape(-1)
            seqs = torch.cat([seqs.repeat_interleave(VOCAB, 0), torch.arange(VOCAB).repeat(seqs.shape[0]).view(-1, 1)], 1)
    return probs


def empirical_counts(tl, prompt, n, seed, length=3, lengths=None, **kw):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(VOCAB**length, dtype=torch.float64)
    for _ in range(n):
        tokens, s = speculative_generate(tl, prompt, length, generator=g, **kw)
        if lengths is not None:
            lengths += s["per_cycle_drafted"]
        counts[sum(int(t) * VOCAB ** (length - 1 - i) for i, t in enumerate(tokens))] += 1
    return counts


def chi_square_pvalue(counts, probs):
    """Pearson chi-square with cells of small expected count pooled into one."""
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue


@pytest.fixture(scope="module")
def small_vocab_model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of tiny generations: threading only adds overhead
    base = make_tiny_llama(vocab_size=VOCAB, layers=3, hidden=16, heads=2, kv_heads=1, init_std=0.6, seed=7)
    yield base, torch.tensor([[1, 3, 2, 4]])
    torch.set_num_threads(threads)


CASES = [  # (temperature, top_p, top_k, exit layer, gamma, draft_stop, the draft head's vocabulary (None: all)):
    # three tokens cover rejections at 1 and 2 and the bonus
    (1.0, 1.0, 0, 1, 2, 0.0, None),
    (0.7, 1.0, 0, 2, 1, 0.0, None),
    (1.3, 0.8, 0, 1, 3, 0.0, None),
    (1.0, 0.9, 3, 2, 2, 0.0, None),
    (1.0, 1.0, 0, 2, 2, 0.7, None),  # adaptive draft length: cycles draft 0, 1 and 2 tokens
    (0.8, 0.9, 0, 2, 2, 0.6, (1, 3, 4)),  # that, and a pruned draft head: q = 0 on tokens 0 and 2
]


@pytest.mark.parametrize("temperature,top_p,top_k,layer,gamma,stop,vocab", CASES)
def test_sampling_matches_target_distribution(small_vocab_model, temperature, top_p, top_k, layer, gamma, stop,
                                              vocab):
    base, prompt = small_vocab_model
    tl = TruncatedLlama(base, layer, EarlyExit(base, layer, vocab=vocab) if vocab else None)
    exact = exact_distribution(base, prompt, Policy(temperature, top_p, top_k))
    lengths = []
    counts = empirical_counts(tl, prompt, SAMPLES, seed=11, gamma=gamma, temperature=temperature,
                              top_p=top_p, top_k=top_k, draft_stop=stop, lengths=lengths)
    assert counts[exact == 0].sum() == 0, "sampled a sequence the policy forbids"
    assert chi_square_pvalue(counts, exact) > 1e-3
    if stop:  # the stop rule really varied the draft length
        assert all(lengths.count(d) > 100 for d in range(gamma + 1)), [lengths.count(d) for d in range(gamma + 1)]


def test_broken_acceptance_rule_fails_the_same_test(small_vocab_model, monkeypatch):
    """Resampling from p instead of max(0, p - q) after a rejection is a classic bug; the test must catch it."""
    base, prompt = small_vocab_model
    tl = TruncatedLlama(base, 1)
    exact = exact_distribution(base, prompt, Policy(1.0))
    with torch.no_grad():  # the exit must differ enough from the target for the bug to matter
        out = tl(prompt)
        overlap = torch.minimum(out.logits[0, -1].softmax(-1), out.exit_logits[0, -1].softmax(-1)).sum()
    assert overlap < 0.9
    monkeypatch.setattr(evaluate, "residual_distribution", lambda p, q: p)
    counts = empirical_counts(tl, prompt, SAMPLES, seed=11, gamma=2, temperature=1.0)
    assert chi_square_pvalue(counts, exact) < 1e-6


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,stop", [(0.0, 0.0), (1.0, 0.0), (0.0, 0.05), (1.0, 0.05)])
def test_stats_invariants(temperature, stop):
    base = make_tiny_llama(layers=4, init_std=0.2, seed=5)
    prompt = torch.randint(0, 259, (1, 5), generator=torch.Generator().manual_seed(2))
    tl = TruncatedLlama(base, 2, perturbed_exit(base, 2, adapter="block"))
    gamma = 3
    tokens, s = speculative_generate(tl, prompt, 40, gamma=gamma, temperature=temperature, top_p=0.9,
                                     generator=torch.Generator().manual_seed(0), draft_stop=stop)
    assert s["new_tokens"] == len(tokens) == 40
    assert 0 <= s["accepted"] <= s["drafted"]
    assert sum(s["accept_hist"]) == s["target_calls"] == len(s["per_cycle"])
    assert sum(k * c for k, c in enumerate(s["accept_hist"])) == s["accepted"]
    assert s["avg_accepted"] == pytest.approx(s["accepted"] / s["target_calls"])
    assert s["acceptance_rate"] == pytest.approx(s["accepted"] / s["drafted"])
    assert 0 <= s["avg_overlap"] <= 1 and s["avg_tv"] == pytest.approx(1 - s["avg_overlap"])
    assert sum(s["from_draft"]) == s["accepted"]
    # each cycle drafts at most min(gamma, tokens still needed - 1): the cycles add up to exactly 40 tokens
    assert s["accepted"] + s["target_calls"] == 40
    assert s["tokens_per_s"] > 0 and s["seconds"] > 0
    # the realised draft lengths
    lens, hist = s["per_cycle_drafted"], s["draft_len_hist"]
    assert len(lens) == s["target_calls"] and sum(lens) == s["drafted"] and len(hist) == gamma + 1
    assert hist == [lens.count(d) for d in range(gamma + 1)]
    assert s["avg_draft_len"] == pytest.approx(s["drafted"] / s["target_calls"])
    assert all(k <= d for k, d in zip(s["per_cycle"], lens))
    assert s["rejected"] == sum(k < d for k, d in zip(s["per_cycle"], lens))
    caps = cycle_caps(s["per_cycle"], gamma, 40)
    assert (lens == caps) if not stop else (lens != caps and all(d <= c for d, c in zip(lens, caps)))


def test_eos_stops_generation_and_is_included():
    base = make_tiny_llama(layers=4, init_std=0.2, seed=6)
    prompt = torch.randint(0, 259, (1, 5), generator=torch.Generator().manual_seed(3))
    tl = TruncatedLlama(base, 2)
    full, _ = autoregressive_generate(tl, prompt, 30)
    eos = int(full[12])
    cut = full[: full.tolist().index(eos) + 1]
    ar, _ = autoregressive_generate(tl, prompt, 30, eos_token_id=eos)
    assert torch.equal(ar, cut)
    for gamma in (1, 4, 8):
        sp, s = speculative_generate(tl, prompt, 30, gamma=gamma, eos_token_id=[eos, 10_000])
        assert torch.equal(sp, cut)
        assert s["new_tokens"] == len(cut)


def test_greedy_overlap_uses_temperature_one_distributions():
    base = make_tiny_llama(layers=3, init_std=0.3, seed=8)
    tl = TruncatedLlama(base, 1)
    prompt = torch.tensor([[3, 4, 5]])
    _, s = speculative_generate(tl, prompt, 2, gamma=1)
    with torch.no_grad():
        out = tl(prompt)
    want = torch.minimum(out.logits[0, -1].softmax(-1), out.exit_logits[0, -1].softmax(-1)).sum().item()
    assert s["drafted"] == 1 and s["avg_overlap"] == pytest.approx(want, abs=1e-5)


@pytest.mark.parametrize("kw,flag", [
    (dict(gamma=0), "--gammas"), (dict(gamma=2.5), "--gammas"), (dict(gamma=2, temperature=-0.1), "--temperatures"),
    (dict(gamma=2, top_p=0.0), "--top_p"), (dict(gamma=2, top_p=1.2), "--top_p"), (dict(gamma=2, top_k=-1), "--top_k"),
    (dict(gamma=2, draft_stop=1.0), "--draft_stop"), (dict(gamma=2, draft_stop=-0.1), "--draft_stop"),
])
def test_bad_values_raise_one_clear_sentence(kw, flag):
    tl = TruncatedLlama(make_tiny_llama(layers=2), 1)
    with pytest.raises(ValueError, match=flag) as e:
        speculative_generate(tl, torch.tensor([[1, 2]]), 4, **kw)
    assert str(e.value).count(".") >= 1 and "\n" not in str(e.value)


def test_generation_past_the_models_positions_is_a_value_error():
    tl = TruncatedLlama(make_tiny_llama(layers=2), 1)  # max_position_embeddings 512
    prompt = torch.ones(1, 500, dtype=torch.long)
    for generate, kw in ((speculative_generate, dict(gamma=2)), (autoregressive_generate, {})):
        with pytest.raises(ValueError, match=r"^--max_new_tokens 13 plus the prompt's 500 tokens needs 513 positions, "
                                             r"more than this model's limit of 512 positions \(max_position_embeddings\); "
                                             r"use --max_new_tokens 12 or less\.$"):
            generate(tl, prompt, 13, **kw)
        assert len(generate(tl, prompt, 12, **kw)[0]) == 12


def test_policy_matches_transformers_sampling_order():
    """temperature -> top-k -> top-p (transformers' order); top-p keeps the smallest set reaching top_p."""
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0)) * 3
    for t, p, k in itertools.product([0.5, 1.0, 1.7], [0.3, 0.9, 1.0], [0, 5]):
        ours = Policy(t, p, k).probs(logits)
        ref = logits.float() / t
        if k:
            kth = ref.topk(k, dim=-1).values[:, -1:]
            ref = ref.masked_fill(ref < kth, float("-inf"))
        srt, idx = ref.sort(dim=-1)
        cum = srt.softmax(-1).cumsum(-1)
        remove = cum <= 1 - p
        remove[:, -1] = False
        ref = ref.masked_fill(remove.scatter(1, idx, remove), float("-inf"))
        assert torch.allclose(ours, ref.softmax(-1), atol=1e-6), (t, p, k)


def test_policy_equals_transformers_warpers_on_a_large_vocabulary():
    """The candidates-first top-p keeps the same tokens as transformers' sorting warpers, also when the first
    candidates hold too little mass (flat rows: the 1,024-candidate look and the full sort)."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.cat([torch.randn(2, 49152, generator=gen) * s for s in (8.0, 1.0, 0.05)])  # peaked .. flat
    for t, p, k in [(0.7, 0.95, 0), (1.0, 0.5, 0), (1.3, 0.99, 0), (0.7, 0.9, 40), (1.0, 1.0, 3000)]:
        ref = logits.clone()
        for w in ([TemperatureLogitsWarper(t)] + ([TopKLogitsWarper(k)] if k else [])
                  + ([TopPLogitsWarper(p)] if p < 1 else [])):
            ref = w(None, ref)
        ours, ref = Policy(t, p, k).probs(logits), ref.softmax(-1)
        # the same kept set, but for at most one token per row at the boundary of a flat row, where summing 49,152
        # masses from the top (ours) or from the bottom (transformers) rounds the boundary differently
        differ = (ours > 0) != (ref > 0)
        assert differ.sum(-1).max() <= 1 and torch.where(differ, ours + ref, 0).max() < 1e-4, (t, p, k)
        assert torch.allclose(ours[~differ.any(-1)], ref[~differ.any(-1)], atol=1e-6, rtol=1e-4), (t, p, k)


def test_sample_draws_from_its_row():
    probs = torch.tensor([[0.5, 0.0, 0.2, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 2.0]])  # any positive total
    gen = torch.Generator().manual_seed(3)
    draws = torch.stack([evaluate.sample(probs, gen) for _ in range(20000)])
    assert draws[:, 1].eq(4).all()
    counts = torch.bincount(draws[:, 0], minlength=5).double()
    assert counts[1] == counts[4] == 0
    assert chisquare(counts[[0, 2, 3]].numpy(), (probs[0, [0, 2, 3]].double() * 20000).numpy()).pvalue > 1e-3


@pytest.mark.slow
def test_smollm2_greedy_self_speculation_is_lossless(smollm2):
    model, tok = smollm2
    msgs = [{"role": "user", "content": "Write a short poem about the sea."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    for layer in (8, 22):
        tl = TruncatedLlama(model, layer)
        ar, _ = autoregressive_generate(tl, ids, 48, eos_token_id=tok.eos_token_id)
        sp, stats = speculative_generate(tl, ids, 48, gamma=4, eos_token_id=tok.eos_token_id)
        assert torch.equal(sp, ar), layer
    assert stats["accepted"] > 0  # the untrained exit at layer 22 agrees often enough to accept some drafts


# ---------------------------------------------------------------------------------------------------------------
# The sweep: command line, results files, resume, several processes. A tiny model saved to disk stands in for SmolLM2.

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

from conftest import make_tiny_tokenizer
from evaluate import TIMING_FIELDS, Cell, make_cells, merge_results, parse_layers, predicted_speedup, read_rows
from truncated_llama import load_base_model, model_fingerprint
from tuned_llama import save_exit

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
        if r["temperature"] == 0:
            assert r["matches_baseline"] is True and r["top_p"] == 1.0
        else:
            assert r["matches_baseline"] is None and r["top_p"] == 0.95
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
    context = {"exit_ids": {"untrained": "untrained"}, "model": "m"}
    old_key = {"exit": "untrained", "exit_layer": 2, "gamma": 2, "temperature": 0.0, "top_p": 1.0, "top_k": 0}
    old_id = hashlib.sha256(json.dumps({**old_key, **context, "exit_id": "untrained"}, sort_keys=True).encode())
    assert evaluate.cell_id(Cell("untrained", 2, 2, 0.0, 1.0, 0), context) == old_id.hexdigest()[:16]
    assert evaluate.cell_id(Cell("untrained", 2, 2, 0.0, 1.0, 0, 0.2), context) != old_id.hexdigest()[:16]


def test_judged_drafts_count_one_rejection_per_cycle_that_stops_early():
    # gamma 3, 10 tokens: cycles draft 3, 3, 3 (4 + 1 + 3 tokens), then min(3, 10 - 8 - 1) = 1, then 0
    assert evaluate.judged_drafts([3, 0, 2, 0, 0], [3, 3, 3, 1, 0]) == (5, 3)
    # a cycle may draft fewer than gamma (the end, or an adaptive stop); accepting all of them is no rejection
    assert evaluate.judged_drafts([3, 3, 1], [3, 3, 1]) == (7, 0)
    assert evaluate.judged_drafts([0, 0], [1, 0]) == (0, 1)
    assert evaluate.judged_drafts([1, 0, 2, 0], [1, 0, 2, 2]) == (3, 1)  # stopped after 1 and 0 drafts
    with pytest.raises(ValueError):
        evaluate.judged_drafts([2], [1])
    # the loop's own counts: without a stop, cycles draft min(gamma, tokens still needed - 1); with one, at most that
    base = make_tiny_llama(layers=4, init_std=0.2, seed=5)
    for stop in (0.0, 0.06):
        _, s = speculative_generate(TruncatedLlama(base, 3), torch.tensor([[1, 2, 3]]), 23, gamma=4, draft_stop=stop)
        caps = cycle_caps(s["per_cycle"], 4, 23)
        assert sum(s["per_cycle_drafted"]) == s["drafted"]
        assert (s["per_cycle_drafted"] == caps) == (stop == 0)
        accepted, rejected = evaluate.judged_drafts(s["per_cycle"], s["per_cycle_drafted"])
        assert accepted == s["accepted"] and rejected == s["rejected"]
        # a cycle that drafted nothing judged nothing: counting it as a rejection would understate alpha
        assert rejected == sum(k < d for k, d in zip(s["per_cycle"], s["per_cycle_drafted"]))
        if stop:
            assert 0 in s["per_cycle_drafted"] and rejected < sum(k < c for k, c in zip(s["per_cycle"], caps))


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
        c = evaluate.break_even_c(a, g, v)
        assert predicted_speedup(a, g, c, v=v) == pytest.approx(1.0)
        assert predicted_speedup(a, g, c - 0.01, v=v) > 1 > predicted_speedup(a, g, c + 0.01, v=v)


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
    assert evaluate.best_line(rows) == ("best lossless speedup: 1.31x (exit_L6, L 6, gamma 2, greedy, "
                                        "16 prompts x 128 tokens)")
    rows.append(fake_row("runs/speedup/exit_L6", 6, 4, 0.7, 1.456, None, draft_stop=0.3))
    assert evaluate.best_line(rows) == ("best lossless speedup: 1.46x (exit_L6, L 6, gamma 4, T=0.7, top_p=0.95, "
                                        "draft_stop 0.3, 16 prompts x 128 tokens)")
    assert evaluate.best_line(rows[:1]).startswith("best lossless speedup: none")
    # from a results file, as `make speedup` prints it: one line, the last one
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (rows[0], rows[2], rows[3]))
                                            + '{"cell_id": "cut')
    evaluate.main(["--best_line", str(tmp_path)])
    out = capsys.readouterr().out
    assert out == "best lossless speedup: 1.25x (exit_L6, L 6, gamma 4, T=0.7, top_p=0.95, 16 prompts x 128 tokens)\n"
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


def test_merge_keeps_each_cell_once_in_cell_order(tmp_path):
    row = lambda cid, v: {"cell_id": cid, "v": v}
    (tmp_path / "results.jsonl").write_text(json.dumps(row("b", 1)) + "\n" + '{"cell_id": "c", "v"')
    (tmp_path / "results.rank0.jsonl").write_text(json.dumps(row("a", 2)) + "\n" + json.dumps(row("b", 3)) + "\n")
    (tmp_path / "results.rank1.jsonl").write_text(json.dumps(row("c", 4)) + "\n" + json.dumps(row("z", 5)) + "\n")
    rows = merge_results(tmp_path, ["a", "b", "c"])
    assert rows == [row("a", 2), row("b", 1), row("c", 4)]
    assert read_rows(tmp_path / "results.jsonl") == rows + [row("z", 5)]  # another sweep's row is kept, last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]


def test_prompt_file_takes_the_turns_before_the_last_reply(tmp_path):
    tok = make_tiny_tokenizer()
    path = tmp_path / "p.jsonl"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"}]
    path.write_text(json.dumps({"messages": msgs}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    prompts, blocks = evaluate.load_prompt_file(path, tok, 2, 100, 8)
    render = lambda turns: tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert [p["text"] for p in prompts] == [render(msgs[:3]), render([{"role": "user", "content": "x"}])]
    assert blocks and all(len(b["input_ids"]) == 8 for b in blocks)


def test_prompt_file_is_read_strictly_and_gives_the_prompts_asked_for(tmp_path, caplog):
    tok = make_tiny_tokenizer()
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": ""}\n{"prompt": "b"}\n{"messages": "c"}\n{bad\n{"prompt": "d"}\n')
    with pytest.raises(evaluate.DataError, match=r"^--dataset: line 5 of .*p\.jsonl is not valid JSON"):
        evaluate.load_prompt_file(path, tok, 2, 100, 8)
    path.write_text('{"prompt": "a"}\n{"prompt": ""}\n{"prompt": "b"}\n')
    with pytest.raises(evaluate.DataError, match=r'^--dataset: line 2 of .*p\.jsonl has no usable prompt \(a non-empty '
                                                 r'"prompt" string, or "messages": a list of \{"role", "content"\} '
                                                 r'strings\); fix it, or pass --skip_bad_lines to skip such entries\.$'):
        evaluate.load_prompt_file(path, tok, 2, 100, 8)
    with caplog.at_level("INFO", logger="data_utils"):
        prompts, _ = evaluate.load_prompt_file(path, tok, 2, 100, 8, skip_bad_lines=True)
    render = lambda text: tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,  # noqa: E731
                                                  add_generation_prompt=True)
    assert [p["text"] for p in prompts] == [render("a"), render("b")]
    assert f"skipped 1 bad entry (--skip_bad_lines): line 2 of {path}" in caplog.text
    with pytest.raises(evaluate.DataError, match=r"^--num_prompts 3: .*p\.jsonl has only 2 prompts of at most 100 "
                                                 r"tokens \(--max_prompt_tokens\); ask for fewer prompts or change "
                                                 r"--max_prompt_tokens\.$"):
        evaluate.load_prompt_file(path, tok, 3, 100, 8, skip_bad_lines=True)


def test_sigterm_mid_sweep_keeps_the_finished_cells_and_resumes_each_cell_once(assets, full_sweep, capsys,
                                                                               monkeypatch):
    """SIGTERM while the 6th cell runs: that cell is dropped, the 5 before it stay, one line says so and gives the
    command that finishes the sweep; exit status 143. The resumed sweep has every cell once, as an uninterrupted one."""
    import os
    import shlex
    import signal

    import data_utils
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
    python = data_utils._program(sys.executable, "python")
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
