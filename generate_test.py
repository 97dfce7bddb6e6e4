"""The self-speculative loop (generate.py): lossless (greedy and sampling, also with a pruned draft head and an
adaptive draft length), stats, EOS, bad values, the policy and the sampler."""
import collections
import itertools

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import generate
import sampling
from conftest import make_tiny_llama
from drafts import Drafting, ExitTree, Turn
from generate import Policy, autoregressive_generate, plan, speculative_generate
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


def greedy_reference(tie, new=24):
    """A tiny 6-layer model, a 9-token prompt and `generate`'s greedy continuation of `new` tokens."""
    base = make_tiny_llama(layers=6, init_std=0.2, tie=tie, seed=3)
    prompt = torch.randint(0, 259, (1, 9), generator=torch.Generator().manual_seed(0))
    ref = base.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)[0, prompt.shape[1]:]
    return base, prompt, new, ref


@pytest.mark.parametrize("tie", [False, True])
def test_greedy_equals_autoregressive_and_generate(tie):
    base, prompt, new, ref = greedy_reference(tie)
    stopped_early = 0
    for layer in (1, 3, 5):
        tl = TruncatedLlama(base, layer)
        ar, _ = autoregressive_generate(tl, prompt, new)
        assert torch.equal(ar, ref)
        for gamma, stop in itertools.product((1, 2, 4, 7, 100), (0.0, 0.06)):  # 100 > max_new_tokens
            sp, stats = speculative_generate(tl, prompt, new, **plan(gamma=gamma, draft_stop=stop))
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
        sp, stats = speculative_generate(tl, prompt, 30, **plan(gamma=gamma, draft_stop=stop))
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
        tokens, s = speculative_generate(tl, prompt, length, **plan(**kw), generator=g)
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
    monkeypatch.setattr(sampling, "residual_distribution", lambda p, q: p)
    counts = empirical_counts(tl, prompt, SAMPLES, seed=11, gamma=2, temperature=1.0)
    assert chi_square_pvalue(counts, exact) < 1e-6


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature,stop", [(0.0, 0.0), (1.0, 0.0), (0.0, 0.05), (1.0, 0.05)])
def test_stats_invariants(temperature, stop):
    base = make_tiny_llama(layers=4, init_std=0.2, seed=5)
    prompt = torch.randint(0, 259, (1, 5), generator=torch.Generator().manual_seed(2))
    tl = TruncatedLlama(base, 2, perturbed_exit(base, 2, adapter="block"))
    gamma = 3
    tokens, s = speculative_generate(tl, prompt, 40, **plan(gamma=gamma, temperature=temperature, top_p=0.9,
                                     draft_stop=stop), generator=torch.Generator().manual_seed(0))
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
        sp, s = speculative_generate(tl, prompt, 30, **plan(gamma=gamma), eos_token_id=[eos, 10_000])
        assert torch.equal(sp, cut)
        assert s["new_tokens"] == len(cut)


def test_greedy_overlap_uses_temperature_one_distributions():
    base = make_tiny_llama(layers=3, init_std=0.3, seed=8)
    tl = TruncatedLlama(base, 1)
    prompt = torch.tensor([[3, 4, 5]])
    _, s = speculative_generate(tl, prompt, 2, **plan(gamma=1))
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
        speculative_generate(tl, torch.tensor([[1, 2]]), 4, **plan(**kw))
    assert str(e.value).count(".") >= 1 and "\n" not in str(e.value)


def test_generation_past_the_models_positions_is_a_value_error():
    tl = TruncatedLlama(make_tiny_llama(layers=2), 1)  # max_position_embeddings 512
    prompt = torch.ones(1, 500, dtype=torch.long)
    for generate_fn, kw in ((speculative_generate, plan(gamma=2)), (autoregressive_generate, {})):
        with pytest.raises(ValueError, match=r"^--max_new_tokens 13 plus the prompt's 500 tokens needs 513 positions, "
                                             r"more than this model's limit of 512 positions \(max_position_embeddings\); "
                                             r"use --max_new_tokens 12 or less\.$"):
            generate_fn(tl, prompt, 13, **kw)
        assert len(generate_fn(tl, prompt, 12, **kw)[0]) == 12


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
    draws = torch.stack([generate.sample(probs, gen) for _ in range(20000)])
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
        sp, stats = speculative_generate(tl, ids, 48, **plan(gamma=4), eos_token_id=tok.eos_token_id)
        assert torch.equal(sp, ar), layer
    assert stats["accepted"] > 0  # the untrained exit at layer 22 agrees often enough to accept some drafts


@pytest.mark.slow
def test_smollm2_greedy_trees_equal_autoregressive_and_generate(smollm2):
    model, tok = smollm2
    msgs = [{"role": "user", "content": "Explain why the sky is blue, briefly."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    new = 40
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)[0, ids.shape[1]:]
    for layer in (22,):
        tl = TruncatedLlama(model, layer)
        ar, _ = autoregressive_generate(tl, ids, new)
        assert torch.equal(ar, ref), layer
        for gamma, width, nodes in ((1, 4, 0), (2, 4, 8)):
            sp, stats = speculative_generate(tl, ids, new, **plan(gamma=gamma, tree_width=width, tree_nodes=nodes))
            assert torch.equal(sp, ar), (layer, gamma, width)
    assert stats["accepted"] > 0


def test_judged_drafts_count_one_rejection_per_cycle_that_stops_early():
    # gamma 3, 10 tokens: cycles draft 3, 3, 3 (4 + 1 + 3 tokens), then min(3, 10 - 8 - 1) = 1, then 0
    assert generate.judged_drafts([3, 0, 2, 0, 0], [3, 3, 3, 1, 0]) == (5, 3)
    # a cycle may draft fewer than gamma (the end, or an adaptive stop); accepting all of them is no rejection
    assert generate.judged_drafts([3, 3, 1], [3, 3, 1]) == (7, 0)
    assert generate.judged_drafts([0, 0], [1, 0]) == (0, 1)
    assert generate.judged_drafts([1, 0, 2, 0], [1, 0, 2, 2]) == (3, 1)  # stopped after 1 and 0 drafts
    with pytest.raises(ValueError):
        generate.judged_drafts([2], [1])
    # the loop's own counts: without a stop, cycles draft min(gamma, tokens still needed - 1); with one, at most that
    base = make_tiny_llama(layers=4, init_std=0.2, seed=5)
    for stop in (0.0, 0.06):
        _, s = speculative_generate(TruncatedLlama(base, 3), torch.tensor([[1, 2, 3]]), 23, **plan(gamma=4,
                                    draft_stop=stop))
        caps = cycle_caps(s["per_cycle"], 4, 23)
        assert sum(s["per_cycle_drafted"]) == s["drafted"]
        assert (s["per_cycle_drafted"] == caps) == (stop == 0)
        accepted, rejected = generate.judged_drafts(s["per_cycle"], s["per_cycle_drafted"])
        assert accepted == s["accepted"] and rejected == s["rejected"]
        # a cycle that drafted nothing judged nothing: counting it as a rejection would understate alpha
        assert rejected == sum(k < d for k, d in zip(s["per_cycle"], s["per_cycle_drafted"]))
        if stop:
            assert 0 in s["per_cycle_drafted"] and rejected < sum(k < c for k, c in zip(s["per_cycle"], caps))


# ---------------------------------------------------------------------------------------------------------------
# Trees of drafts: greedy equals autoregressive, sampling is exact, the cache keeps the accepted path only.

TREES = ((1, 2, 0), (1, 4, 0), (2, 2, 0), (2, 3, 4), (3, 4, 0), (4, 2, 5))  # (gamma = depth, width, nodes)


@pytest.mark.parametrize("tie", [False, True])
def test_greedy_trees_equal_autoregressive_and_generate(tie):
    base, prompt, new, ref = greedy_reference(tie)
    for layer in (1, 3, 5):
        tl = TruncatedLlama(base, layer)
        for (gamma, width, nodes), stop in itertools.product(TREES, (0.0, 0.06)):
            sp, stats = speculative_generate(tl, prompt, new, **plan(gamma=gamma, tree_width=width, tree_nodes=nodes,
                                             draft_stop=stop))
            assert torch.equal(sp, ref), (layer, gamma, width, nodes, stop)
            assert stats["cache_positions"] == [prompt.shape[1] + new - 1] * 6  # exactly the committed tokens
            budget = nodes or width * gamma
            assert max(stats["per_cycle_drafted"]) <= budget and max(stats["per_cycle"]) <= gamma
            assert stats["tree_width"] == width and stats["tree_nodes"] == budget
            assert sum(stats["draft_rows_hist"][width + 1:]) == 0  # a draft step runs at most `width` rows
            assert 0 < stats["seconds"] < 60 and stats["tokens_per_s"] == pytest.approx(new / stats["seconds"])


@pytest.mark.parametrize("kw", [dict(adapter="block"), dict(adapter="mlp"), dict(last_block=True),
                                dict(last_block=True, adapter="block"), dict(adapter="block", vocab=PRUNED)])
def test_greedy_trees_lossless_with_trained_looking_exits(kw):
    base = make_tiny_llama(layers=5, init_std=0.2, seed=4)
    prompt = torch.randint(0, 259, (1, 6), generator=torch.Generator().manual_seed(1))
    tl = TruncatedLlama(base, 3, perturbed_exit(base, 3, **kw))
    ar, _ = autoregressive_generate(tl, prompt, 30)
    for gamma, width, nodes in TREES:
        sp, stats = speculative_generate(tl, prompt, 30, **plan(gamma=gamma, tree_width=width, tree_nodes=nodes))
        assert torch.equal(sp, ar), (kw, gamma, width)
        assert stats["accepted"] > 0


def test_tree_cache_holds_the_accepted_path_as_a_fresh_prefill_would():
    """After tree cycles, every layer's keys and values (shared, remaining and the exit's own block) at 0..n-1 are
    those of a plain prefill of the committed tokens: the accepted path was moved, nothing recomputed."""
    base = make_tiny_llama(layers=5, init_std=0.2, seed=4)
    tl = TruncatedLlama(base, 2, perturbed_exit(base, 2, adapter="block"))
    prompt = torch.randint(0, 259, (1, 7), generator=torch.Generator().manual_seed(2))
    policy = Policy(0.0)
    with torch.inference_mode():
        cache, n, last = generate._prefill(tl, prompt, with_exit=True, room=64)
        committed = prompt[0].tolist()
        for _ in range(6):
            turn = Turn(tl, policy, cache, n, last, int(last), 64)
            cycle = generate.run_cycle(turn, ExitTree(3, 3, 7).propose(turn))
            cache.keep(n, [n + i for i in cycle.path])
            n += cycle.accepted + 1
            committed += cycle.drafts + [cycle.token]
            last = torch.tensor([[cycle.token]])
        assert [cache.length(i) for i in range(5 + 1)] == [n] * 6  # 5 base layers + the exit's block
        fresh = tl.new_cache(64)
        tl.full_step(torch.tensor([committed[:n]]), fresh, 0, with_exit=True)
    torch.testing.assert_close(cache.k[:, :, :n], fresh.k[:, :, :n], rtol=0, atol=1e-5)
    torch.testing.assert_close(cache.v[:, :, :n], fresh.v[:, :, :n], rtol=0, atol=1e-5)


def test_tree_width_one_is_the_chain():
    base = make_tiny_llama(layers=4, init_std=0.2, seed=5)
    tl = TruncatedLlama(base, 2)
    prompt = torch.tensor([[1, 2, 3]])
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9), dict(temperature=0.7, draft_stop=0.05)):
        chain = speculative_generate(tl, prompt, 20, **plan(gamma=3, **kw), generator=torch.Generator().manual_seed(4))
        tree = speculative_generate(tl, prompt, 20, **plan(gamma=3, tree_width=1, tree_nodes=9, **kw),
                                    generator=torch.Generator().manual_seed(4))
        assert torch.equal(chain[0], tree[0])
        drop = ("seconds", "tokens_per_s")
        assert {k: v for k, v in chain[1].items() if k not in drop} == {k: v for k, v in tree[1].items()
                                                                          if k not in drop}


def test_a_width_4_tree_at_depth_1_never_needs_more_target_calls_than_the_chain():
    """Greedy, float32: the tree's candidates include the chain's draft, so it advances at least as far each cycle."""
    base = make_tiny_llama(layers=6, init_std=0.2, seed=3)
    more = 0
    for layer, seed in itertools.product((1, 2, 3, 4), range(3)):
        tl = TruncatedLlama(base, layer)
        prompt = torch.randint(0, 259, (1, 8), generator=torch.Generator().manual_seed(seed))
        chain_tokens, chain = speculative_generate(tl, prompt, 32, **plan(gamma=1))
        tree_tokens, tree = speculative_generate(tl, prompt, 32, **plan(gamma=1, tree_width=4))
        assert torch.equal(chain_tokens, tree_tokens)
        assert tree["target_calls"] <= chain["target_calls"], (layer, seed)
        more += tree["accepted"] > chain["accepted"]
    assert more > 0  # the extra candidates do get accepted


def test_trees_need_the_lean_engine_and_valid_sizes():
    base = make_tiny_llama(layers=4)
    with pytest.raises(ValueError, match=r"^--tree_widths: trees of drafts need the lean engine"):
        speculative_generate(TruncatedLlama(base, 2, engine="hf"), torch.tensor([[1, 2]]), 4, **plan(gamma=2,
                             tree_width=2))
    tl = TruncatedLlama(base, 2)
    for kw, flag in ((dict(tree_width=0), "--tree_widths"), (dict(tree_nodes=-1), "--tree_nodes")):
        with pytest.raises(ValueError, match=f"^{flag}: "):
            speculative_generate(tl, torch.tensor([[1, 2]]), 4, **plan(gamma=2, **kw))


TREE_CASES = [  # (temperature, top_p, top_k, exit layer, gamma = depth, width, nodes, draft_stop, draft vocabulary)
    (1.0, 1.0, 0, 1, 2, 2, 0, 0.0, None),
    (0.7, 1.0, 0, 2, 1, 3, 0, 0.0, None),
    (1.3, 0.8, 0, 1, 3, 2, 4, 0.0, None),
    (1.0, 0.9, 3, 2, 2, 3, 0, 0.0, None),
    (1.0, 1.0, 0, 2, 2, 2, 0, 0.5, None),  # a node whose draft is unsure is not expanded
    (0.8, 0.9, 0, 2, 2, 2, 3, 0.4, (1, 3, 4)),  # that, and a pruned draft head
]


@pytest.mark.parametrize("temperature,top_p,top_k,layer,gamma,width,nodes,stop,vocab", TREE_CASES)
def test_sampling_trees_match_target_distribution(small_vocab_model, temperature, top_p, top_k, layer, gamma, width,
                                                  nodes, stop, vocab):
    base, prompt = small_vocab_model
    tl = TruncatedLlama(base, layer, EarlyExit(base, layer, vocab=vocab) if vocab else None)
    exact = exact_distribution(base, prompt, Policy(temperature, top_p, top_k))
    lengths = []
    counts = empirical_counts(tl, prompt, SAMPLES, seed=11, gamma=gamma, temperature=temperature, top_p=top_p,
                              top_k=top_k, draft_stop=stop, tree_width=width, tree_nodes=nodes, lengths=lengths)
    assert counts[exact == 0].sum() == 0, "sampled a sequence the policy forbids"
    assert chi_square_pvalue(counts, exact) > 1e-3
    assert max(lengths) > 1  # cycles really drafted trees (per_cycle_drafted counts their nodes)


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 0.8)])
def test_the_host_walk_is_the_device_walk(temperature, top_p, monkeypatch):
    """On a CPU accept_tree walks the tree on the host (reads cost nothing there), elsewhere on the device: on the same
    trees, target logits and seeds both give the same path, token and rejection, and leave the generator alike."""
    from drafts import Tree

    policy, deep, rejected = Policy(temperature, top_p), 0, 0
    for seed in range(80):
        g = torch.Generator().manual_seed(seed)
        tree = Tree(5, 0, torch.device("cpu"))
        for _ in range(int(torch.randint(2, 14, (1,), generator=g))):  # a random tree, distinct tokens per parent
            parent = int(torch.randint(0, len(tree.tokens), (1,), generator=g))
            tree.child(parent, int(torch.randint(0, VOCAB, (1,), generator=g)), "exit")
        tree.walk = sampling.walk_tables(tree, torch.device("cpu"))
        logits = 1.5 * torch.randn(len(tree.tokens), VOCAB, generator=g)
        outcomes = []
        for shortcuts in (("cpu",), ()):
            monkeypatch.setattr(Policy, "SHORTCUTS", shortcuts)
            gen = torch.Generator().manual_seed(seed)
            path, token, rej, _ = sampling.accept_tree(policy, tree, logits, gen)
            outcomes.append((path, token, rej, torch.rand(1, generator=gen).item()))
        assert outcomes[0] == outcomes[1], seed
        deep += len(outcomes[0][0]) > 2
        rejected += outcomes[0][2]
    assert deep > 3 and rejected > 5  # walks went past one draft, and walks ended on rejected candidates


def test_sampling_trees_match_target_distribution_with_the_device_walk(small_vocab_model, monkeypatch):
    """The walk as it runs on a GPU (no host reads), on a CPU: exact too."""
    monkeypatch.setattr(Policy, "SHORTCUTS", ())
    base, prompt = small_vocab_model
    tl = TruncatedLlama(base, 2)
    exact = exact_distribution(base, prompt, Policy(1.0, 0.9, 3))
    counts = empirical_counts(tl, prompt, SAMPLES, seed=11, gamma=2, temperature=1.0, top_p=0.9, top_k=3,
                              tree_width=3)
    assert counts[exact == 0].sum() == 0 and chi_square_pvalue(counts, exact) > 1e-3


def test_a_broken_tree_rule_fails_the_same_test(small_vocab_model, monkeypatch):
    """Accepting each candidate with probability p(c) instead of r(c) / sum r (not renormalising after a rejection)
    is the tree's classic bug; the test must catch it."""
    base, prompt = small_vocab_model
    tl = TruncatedLlama(base, 1)
    exact = exact_distribution(base, prompt, Policy(1.0))
    monkeypatch.setattr(sampling, "accept_draft", lambda p_x, q_x, u: u < p_x)
    counts = empirical_counts(tl, prompt, SAMPLES, seed=11, gamma=1, temperature=1.0, tree_width=3)
    assert chi_square_pvalue(counts, exact) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Prompt lookup and the exit with lookup: the index equals a brute-force scan; greedy equals autoregressive decoding
# and `generate`; sampling is exact (chi-square), and a broken rule for a deterministic proposal fails.

def looping_reference(tie=False, new=40):
    """A tiny model whose greedy reply repeats itself (as small models do), so that lookup has matches to propose."""
    base = make_tiny_llama(layers=6, init_std=0.2, tie=tie, seed=5)
    prompt = torch.tensor([[5, 17, 5, 17, 40, 5, 17, 9]])
    ref = base.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)[0, prompt.shape[1]:]
    return base, prompt, new, ref


LOOKUP_GREEDY = [dict(draft="lookup", gamma=g) for g in (1, 3, 6)] + [
    dict(draft="lookup", gamma=4, ngram=1), dict(draft="lookup", gamma=4, ngram=1, tree_width=3),
    dict(draft="lookup", gamma=3, tree_width=2), dict(draft="exit+lookup", gamma=1, lookup_tokens=4),
    dict(draft="exit+lookup", gamma=3), dict(draft="exit+lookup", gamma=1, lookup_tokens=5, tree_width=3),
    dict(draft="exit+lookup", gamma=2, lookup_tokens=3, tree_width=2, tree_nodes=3)]


@pytest.mark.parametrize("tie", [False, True])
def test_greedy_lookup_and_exit_with_lookup_equal_autoregressive_and_generate(tie):
    base, prompt, new, ref = looping_reference(tie)
    by_source = {"exit": 0, "lookup": 0, "both": 0}
    for layer, kw in itertools.product((2, 4), LOOKUP_GREEDY):
        tl = TruncatedLlama(base, layer, perturbed_exit(base, layer, adapter="block"))
        sp, stats = speculative_generate(tl, prompt, new, **plan(**kw))
        assert torch.equal(sp, ref), (layer, kw)
        assert stats["cache_positions"] == [prompt.shape[1] + new - 1] * 6
        assert sum(stats["source_counts"].values()) == new == len(stats["token_sources"])
        assert stats["source_counts"]["target"] == stats["target_calls"]
        before = list(itertools.accumulate([0] + [k + 1 for k in stats["per_cycle"]]))[:-1]
        assert len(stats["lookup_matched"]) == sum(b < new - 1 for b in before)  # each cycle with room for a draft
        if kw["draft"] == "lookup":
            assert stats["source_counts"]["exit"] == stats["source_counts"]["both"] == 0
        for s in by_source:
            by_source[s] += stats["source_counts"][s]
    assert by_source["lookup"] > 40 and by_source["exit"] > 0 and by_source["both"] > 0


def test_lookup_proposals_stop_at_eos_and_the_length_limit():
    base, prompt, new, ref = looping_reference()
    tl = TruncatedLlama(base, 2)
    eos = int(ref[20])  # a token the reply repeats: the lookup proposes it, and the reply must end there
    for kw in (dict(draft="lookup", gamma=6), dict(draft="exit+lookup", gamma=1, lookup_tokens=6, tree_width=2)):
        sp, stats = speculative_generate(tl, prompt, new, **plan(**kw), eos_token_id=eos)
        stop = int((ref == eos).nonzero()[0]) + 1
        assert torch.equal(sp, ref[:stop]), kw
        for n in (1, 2, 7):
            sp, stats = speculative_generate(tl, prompt, n, **plan(**kw))
            assert torch.equal(sp, ref[:n]) and max(stats["per_cycle"]) <= n - 1, (kw, n)
            if kw["draft"] == "lookup":  # a chain: its proposals fit the tokens left
                assert max(stats["per_cycle_drafted"]) <= n - 1


@pytest.mark.parametrize("draft,kw", [("lookup", dict(temperature=1.0, gamma=2)),
                                      ("lookup", dict(temperature=0.9, top_p=0.9, gamma=2, ngram=1, tree_width=3,
                                                      prompt=[1, 3, 1, 2, 4, 1])),  # "1": two continuations
                                      ("lookup", dict(temperature=0.8, top_p=0.9, top_k=3, gamma=3, ngram=1)),
                                      ("exit+lookup", dict(temperature=1.0, gamma=1, lookup_tokens=2)),
                                      ("exit+lookup", dict(temperature=1.3, top_p=0.8, gamma=2, draft_stop=0.6)),
                                      ("exit+lookup", dict(temperature=1.0, top_k=3, gamma=1, lookup_tokens=2,
                                                           tree_width=2)),
                                      ("exit+lookup", dict(temperature=0.7, top_p=0.9, gamma=2, tree_width=2,
                                                           tree_nodes=3))])
def test_sampling_lookup_matches_target_distribution(small_vocab_model, draft, kw):
    base, _ = small_vocab_model
    kw = dict(kw)
    prompt = torch.tensor([kw.pop("prompt", [1, 3, 2, 4, 1])])  # "1" occurred before: lookup proposes from cycle 1
    tl = TruncatedLlama(base, 1)
    exact = exact_distribution(base, prompt, Policy(kw["temperature"], kw.get("top_p", 1.0), kw.get("top_k", 0)))
    g = torch.Generator().manual_seed(11)
    counts = torch.zeros(VOCAB**3, dtype=torch.float64)
    sources = {"exit": 0, "lookup": 0, "both": 0, "target": 0}
    exit_cycles = tree_cycles = 0
    for _ in range(SAMPLES):
        tokens, s = speculative_generate(tl, prompt, 3, **plan(draft=draft, **kw), generator=g)
        counts[sum(int(t) * VOCAB ** (2 - i) for i, t in enumerate(tokens))] += 1
        for k in sources:
            sources[k] += s["source_counts"][k]
        exit_cycles += sum(kind != "lookup" for kind in s["cycle_kinds"])
        tree_cycles += s["cycle_kinds"].count("tree")
    assert counts[exact == 0].sum() == 0, "sampled a sequence the policy forbids"
    assert chi_square_pvalue(counts, exact) > 1e-3
    assert sources["lookup"] + sources["both"] > 200  # lookup's proposals were really judged and accepted
    if draft == "lookup" and kw.get("tree_width", 1) > 1:  # several continuations, judged as one tree
        assert tree_cycles > 100
    if draft == "exit+lookup":  # and the exit drafted too: where the lookup had no match (chains), in every tree
        assert exit_cycles > 10 and (kw.get("tree_width", 1) == 1 or sources["exit"] + sources["both"] > 50)


def test_a_broken_rule_for_a_deterministic_proposal_fails_the_same_test(small_vocab_model, monkeypatch):
    """Accepting a lookup token without the p(x) draw (as if q = p) is the classic bug for drafts without a q."""
    base, _ = small_vocab_model
    prompt = torch.tensor([[1, 3, 2, 4, 1]])
    tl = TruncatedLlama(base, 1)
    exact = exact_distribution(base, prompt, Policy(1.0))
    monkeypatch.setattr(sampling, "accept_draft", lambda p_x, q_x, u: p_x > 0)
    g = torch.Generator().manual_seed(11)
    counts = torch.zeros(VOCAB**3, dtype=torch.float64)
    for _ in range(SAMPLES):
        tokens, _ = speculative_generate(tl, prompt, 3, **plan(draft="lookup", gamma=2, temperature=1.0), generator=g)
        counts[sum(int(t) * VOCAB ** (2 - i) for i, t in enumerate(tokens))] += 1
    assert chi_square_pvalue(counts, exact) < 1e-6


# Recycled predictions (drafts.Recycled): a tree from the target's own top-k of earlier passes, no model call.

RECYCLE_GREEDY = [dict(gamma=1), dict(gamma=3), dict(gamma=3, tree_width=2), dict(gamma=4, tree_width=3, tree_nodes=8),
                  dict(gamma=2, tree_width=4, tree_nodes=3)]


@pytest.mark.parametrize("tie", [False, True])
def test_greedy_recycled_drafts_equal_autoregressive_and_generate(tie):
    base, prompt, new, ref = looping_reference(tie)
    recycled = 0
    for layer, kw in itertools.product((2, 4), RECYCLE_GREEDY):
        tl = TruncatedLlama(base, layer)
        sp, stats = speculative_generate(tl, prompt, new, **plan(draft="recycle", **kw))
        assert torch.equal(sp, ref), (layer, kw)
        assert stats["cache_positions"] == [prompt.shape[1] + new - 1] * 6
        assert stats["source_counts"]["exit"] == stats["source_counts"]["lookup"] == 0
        assert stats["source_counts"]["target"] == stats["target_calls"]
        assert max(stats["per_cycle_drafted"]) <= (kw.get("tree_nodes") or kw.get("tree_width", 1) * kw["gamma"])
        recycled += stats["source_counts"]["recycled"]
        for n in (1, 2, 5):  # the drafts fit the tokens left
            sp, stats = speculative_generate(tl, prompt, n, **plan(draft="recycle", **kw))
            assert torch.equal(sp, ref[:n]) and max(stats["per_cycle"]) <= n - 1, (kw, n)
    assert recycled > 50


def test_recycled_table_holds_the_latest_top_tokens_after_each_input():
    """After a prefill, the table's row for each prompt token is the target's top entries at its last occurrence."""
    from drafts import Recycled
    base, prompt, _, _ = looping_reference()
    source = Recycled(gamma=2, width=2, budget=4, top=3)
    tl = TruncatedLlama(base, 2)
    with torch.inference_mode():
        generate._prefill(tl, prompt, with_exit=False, room=8, observe=source.observe)
        logits = base(prompt).logits[0, :-1]
    for i, tok in enumerate(prompt[0, :-1].tolist()):
        if tok not in prompt[0, i + 1:-1].tolist():  # its last occurrence before the newest token
            assert source.table[tok].tolist() == logits[i].topk(3).indices.tolist(), i
    assert (source.table[200] == -1).all()  # a token never seen: no prediction


@pytest.mark.parametrize("kw", [dict(temperature=1.0, gamma=2), dict(temperature=1.0, gamma=2, tree_width=2),
                                dict(temperature=0.8, top_p=0.9, top_k=3, gamma=3, tree_width=2, tree_nodes=4),
                                dict(temperature=1.3, top_p=0.8, gamma=1, tree_width=3)])
def test_sampling_recycled_drafts_match_target_distribution(small_vocab_model, kw):
    base, _ = small_vocab_model
    prompt = torch.tensor([[1, 3, 2, 4, 1]])  # "1" seen in the prompt: the table drafts from the first cycle on
    tl = TruncatedLlama(base, 1)
    exact = exact_distribution(base, prompt, Policy(kw["temperature"], kw.get("top_p", 1.0), kw.get("top_k", 0)))
    g = torch.Generator().manual_seed(11)
    counts = torch.zeros(VOCAB**3, dtype=torch.float64)
    recycled = 0
    for _ in range(SAMPLES):
        tokens, s = speculative_generate(tl, prompt, 3, **plan(draft="recycle", **kw), generator=g)
        counts[sum(int(t) * VOCAB ** (2 - i) for i, t in enumerate(tokens))] += 1
        recycled += s["source_counts"]["recycled"]
    assert counts[exact == 0].sum() == 0, "sampled a sequence the policy forbids"
    assert chi_square_pvalue(counts, exact) > 1e-3
    assert recycled > 300  # the recycled drafts were really judged and accepted


def test_a_broken_rule_for_recycled_trees_fails_the_same_test(small_vocab_model, monkeypatch):
    """Not renormalising after a rejected candidate (accepting c with p(c), not r(c) / sum r) must be caught."""
    base, _ = small_vocab_model
    prompt = torch.tensor([[1, 3, 2, 4, 1]])
    tl = TruncatedLlama(base, 1)
    exact = exact_distribution(base, prompt, Policy(1.0))
    monkeypatch.setattr(sampling, "accept_draft", lambda p_x, q_x, u: u < p_x)
    g = torch.Generator().manual_seed(11)
    counts = torch.zeros(VOCAB**3, dtype=torch.float64)
    for _ in range(SAMPLES):
        tokens, _ = speculative_generate(tl, prompt, 3, **plan(draft="recycle", gamma=1, tree_width=3,
                                         temperature=1.0), generator=g)
        counts[sum(int(t) * VOCAB ** (2 - i) for i, t in enumerate(tokens))] += 1
    assert chi_square_pvalue(counts, exact) < 1e-6


# Auto (drafts.AutoDraft): each cycle the proposal with the most expected tokens per unit of measured time.

def test_auto_reads_the_measured_verify_costs_as_non_decreasing():
    """A k-row step never costs less than a (k - 1)-row one: a measured v(k) above a later v(j) (noise) is lowered to
    it, so one stalled round does not rule out every proposal of that size."""
    from drafts import monotone

    c, v, s = monotone((0.2, {1: 1.0, 2: 1.1, 3: 1.6, 4: 1.3, 5: 1.4, 6: 1.35}, 0.016))
    assert (c, s) == (0.2, 0.016) and v == {1: 1.0, 2: 1.1, 3: 1.3, 4: 1.3, 5: 1.35, 6: 1.35}


def test_auto_keeps_the_exits_drafts_while_their_q_promises_tokens_per_second():
    """Auto's exit chain is cut draft by draft by the exit's own q: confident drafts (top probability >= 0.9, learned
    to be accepted) are kept, an unsure one (top < 0.3, learned to be rejected) ends the chain; each kept draft's
    bucket is remembered for learning."""
    from drafts import AutoDraft

    auto = AutoDraft([1, 2, 3], gamma=4, budget=8, lookup_tokens=4, measure=None)
    auto.costs = (0.1, {k: 1 + 0.05 * (k - 1) for k in range(1, 10)}, 0.016)
    for d in range(1, 5):
        auto.counts[("exit", d, "q", 0)] = [95, 100]
        auto.counts[("exit", d, "q", 4)] = [1, 100]
    auto.last = ("exit", [], 4)
    stop = auto.exit_stop(0.0)
    assert [stop(0, 0.95), stop(1, 0.97), stop(2, 0.1)] == [False, False, True]
    assert auto.last[1] == [0, 0]
    auto.last = ("exit", [], 4)
    assert auto.exit_stop(0.0)(0, 0.05)  # an unsure first draft: a plain step


AUTO_GREEDY = [dict(gamma=2), dict(gamma=4, lookup_tokens=6), dict(gamma=3, tree_nodes=12)]


@pytest.mark.parametrize("tie", [False, True])
def test_greedy_auto_equals_autoregressive_and_generate(tie):
    base, prompt, new, ref = looping_reference(tie)
    by_source, choices, runner_up = {"exit": 0, "lookup": 0, "recycled": 0}, {"tree": 0, "exit": 0, "none": 0}, 0
    for layer, kw in itertools.product((2, 5), AUTO_GREEDY):  # a poor exit (perturbed) and a good one (one layer short)
        tl = TruncatedLlama(base, layer, perturbed_exit(base, layer, adapter="block") if layer == 2 else None)
        generate.remember_costs(tl, 0.05, 1.0, {k: 1 + 0.05 * (k - 1) for k in range(2, 20)})  # a GPU-like machine
        sp, stats = speculative_generate(tl, prompt, new, **plan(draft="auto", **kw))
        assert torch.equal(sp, ref), (layer, kw)
        assert stats["cache_positions"] == [prompt.shape[1] + new - 1] * 6
        assert stats["source_counts"]["target"] == stats["target_calls"]
        for s in by_source:
            by_source[s] += stats["source_counts"][s]
        for c in choices:
            choices[c] += stats["auto_choices"][c]
        runner_up += stats["auto_runner_up"][0]  # cycles whose tree held the exit's runner-up
        promise = stats["auto_promise"]  # per choice: cycles, tokens promised, tokens committed
        assert sum(n for n, _, _ in promise.values()) == stats["target_calls"]
        assert sum(t for _, _, t in promise.values()) >= new and all(p >= n for n, p, _ in promise.values())
    assert min(by_source.values()) > 0 and choices["tree"] > 0 and choices["exit"] > 0, (by_source, choices)
    assert runner_up > 10


def test_auto_carries_what_it_learned_into_the_next_generation():
    """The acceptance counts of one generation start the next one with the same model, drafting and policy (weighed
    by CARRY); another policy starts cold; greedy output stays exact in every generation."""
    base, prompt, new, ref = looping_reference()
    tl = TruncatedLlama(base, 2)
    generate.remember_costs(tl, 0.05, 1.0, {k: 1 + 0.05 * (k - 1) for k in range(2, 20)})
    memory = generate.learned(tl, Drafting("auto", 2), Policy())
    judged = []
    for _ in range(3):
        sp, _ = speculative_generate(tl, prompt, new, **plan(draft="auto", gamma=2))
        assert torch.equal(sp, ref)
        judged.append(sum(j for _, j in memory["counts"].values()))
    assert 0 < judged[0] < judged[1] < judged[2] and judged[1] - judged[0] < judged[0]  # carried at half weight
    assert generate.learned(tl, Drafting("auto", 2), Policy(1.0)) == {}


def test_auto_drafts_nothing_where_nothing_pays():
    """With a verify of 2 rows costing 2 steps and a draft step a full one, no proposal can pay: plain steps."""
    base, prompt, new, ref = looping_reference()
    tl = TruncatedLlama(base, 2)
    generate.remember_costs(tl, 1.0, 1.0, {k: float(k) for k in range(2, 20)})
    sp, stats = speculative_generate(tl, prompt, new, **plan(draft="auto", gamma=3))
    assert torch.equal(sp, ref)
    assert stats["auto_choices"]["tree"] == stats["auto_choices"]["exit"] == 0 and stats["drafted"] == 0


GPU_LIKE, DEAR_DRAFTS, CPU_LIKE, DEAR_ROWS = (0.05, 0.05), (1.0, 0.05), (1.0, 0.3), (0.01, 0.45)  # (c, v(k + 1) - v(k))


@pytest.mark.parametrize("prompt,kw,poor,costs,used,kinds", [
    ([1, 3, 2, 4, 1, 3, 2, 4, 1], dict(temperature=1.0, gamma=2), True, GPU_LIKE, ("lookup", "exit"), ("exit+tree",)),
    ([1, 3, 2, 4, 1], dict(temperature=1.0, gamma=2), True, GPU_LIKE, ("recycled", "exit", "runner-up"),
     ("exit+tree",)),
    ([1, 3, 2, 4, 1], dict(temperature=0.8, top_p=0.9, top_k=3, gamma=2), True, DEAR_DRAFTS, ("lookup", "recycled"),
     ("tree",)),
    ([1, 3, 2, 4, 1], dict(temperature=1.0, gamma=2), False, CPU_LIKE, ("lookup",), ("path",)),
    ([1, 3, 2, 4], dict(temperature=1.3, top_p=0.8, gamma=2, lookup_tokens=2, tree_nodes=4), False, DEAR_ROWS,
     ("exit",), ("exit",))])
def test_sampling_auto_matches_target_distribution(small_vocab_model, prompt, kw, poor, costs, used, kinds):
    """`used`: the sources whose drafts must really be accepted ("runner-up": the exit's second likeliest token beside
    its first), `kinds`: auto's choices that must be made (and judged). "1" seen before: lookup proposes and the
    table has an entry; a prompt whose last token was never seen gives neither anything for the first cycle, so the
    exit's chain drafts it. `poor`: an exit whose tokens often differ from the target's (so that the nodes beside them
    are the ones accepted); `costs`: a draft step's cost and each verified row's (flat: the tree grows; a dear draft
    step: no exit; a dear row: one lookup token, a path, or the exit's chain with no runner-up beside it)."""
    base, _ = small_vocab_model
    prompt = torch.tensor([prompt])
    tl = TruncatedLlama(base, 2, perturbed_exit(base, 2, adapter="block") if poor else None)  # else one layer short
    c, slope = costs
    generate.remember_costs(tl, c, 1.0, {k: 1 + slope * (k - 1) for k in range(2, 20)})
    exact = exact_distribution(base, prompt, Policy(kw["temperature"], kw.get("top_p", 1.0), kw.get("top_k", 0)))
    g = torch.Generator().manual_seed(11)
    counts = torch.zeros(VOCAB**3, dtype=torch.float64)
    sources, choices = {"exit": 0, "lookup": 0, "recycled": 0, "runner-up": 0}, collections.Counter()
    for _ in range(SAMPLES):
        tokens, s = speculative_generate(tl, prompt, 3, **plan(draft="auto", **kw), generator=g)
        counts[sum(int(t) * VOCAB ** (2 - i) for i, t in enumerate(tokens))] += 1
        for k in ("exit", "lookup", "recycled"):
            sources[k] += s["source_counts"][k]
        sources["runner-up"] += s["auto_runner_up"][1]
        choices.update(s["auto_choices"])
    assert counts[exact == 0].sum() == 0, "sampled a sequence the policy forbids"
    assert chi_square_pvalue(counts, exact) > 1e-3
    assert all(sources[k] > 100 for k in used) and all(choices[k] > 100 for k in kinds), (sources, choices)


def test_lookup_flags_are_checked():
    tl = TruncatedLlama(make_tiny_llama(layers=4), 2)
    for kw, flag in ((dict(draft="medusa"), "--drafts"), (dict(lookup_tokens=-1), "--lookup_tokens"),
                     (dict(ngram=0), "--ngram"), (dict(tree_width=0), "--tree_widths")):
        with pytest.raises(ValueError, match=f"^{flag}: "):
            speculative_generate(tl, torch.tensor([[1, 2]]), 4, **plan(gamma=2, **kw))


@pytest.mark.slow
def test_smollm2_greedy_lookup_equals_autoregressive_and_generate(smollm2):
    model, tok = smollm2
    text = ("The lighthouse keeper climbed the stairs every evening at dusk. He lit the lamp, wound the clock and "
            "wrote the weather in his book. Repeat the first sentence of this text word for word, then summarise it.")
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    new, eos = 48, tok.eos_token_id
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=eos)[0, ids.shape[1]:]
    tl = TruncatedLlama(model, 4)
    assert torch.equal(autoregressive_generate(tl, ids, new, eos_token_id=eos)[0], ref)
    lookup_tokens = recycled = 0
    for kw in (dict(draft="lookup", gamma=4), dict(draft="exit+lookup", gamma=1, lookup_tokens=4),
               dict(draft="exit+lookup", gamma=1, lookup_tokens=4, tree_width=2),
               dict(draft="recycle", gamma=3, tree_width=2, tree_nodes=6), dict(draft="auto", gamma=2)):
        sp, stats = speculative_generate(tl, ids, new, **plan(**kw), eos_token_id=eos)
        assert torch.equal(sp, ref), kw
        lookup_tokens += stats["source_counts"]["lookup"] + stats["source_counts"]["both"]
        recycled += stats["source_counts"]["recycled"]
    assert lookup_tokens > 10 and recycled > 5


# ---------------------------------------------------------------------------------------------------------------
# Host reads per cycle: each is a stall on a GPU (host_reads.py). A chain, greedy or sampled, and a lookup cycle read
# back once (the target: at most 2); a tree once per draft level and once for its walk (target: at most 4).
# Counted on a CPU, where the reads cost nothing.

READ_BUDGETS = [  # (speculative_generate's arguments, reads allowed a cycle: 1 a chain, a tree's levels + 1, recycled 2,
    # auto gamma + 2)
    (dict(gamma=4), 1), (dict(gamma=4, temperature=1.0), 1), (dict(gamma=4, temperature=0.8, top_p=0.9, top_k=50), 1),
    (dict(gamma=4, draft="lookup"), 1), (dict(gamma=4, draft="lookup", tree_width=3), 1),
    (dict(gamma=2, draft="exit+lookup", lookup_tokens=4), 1),
    (dict(gamma=2, tree_width=2), 3), (dict(gamma=3, tree_width=2, temperature=1.0), 4),
    (dict(gamma=2, tree_width=2, draft="exit+lookup", lookup_tokens=4), 3),
    (dict(gamma=3, tree_width=2, draft="recycle"), 2), (dict(gamma=3, tree_width=2, draft="recycle", temperature=1.0), 2),
    (dict(gamma=2, draft="auto"), 4), (dict(gamma=2, draft="auto", temperature=1.0), 4)]  # auto: the exit's levels in
# a tree (up to gamma), the recycled gather and the walk


@pytest.mark.parametrize("kw,budget", READ_BUDGETS)
def test_host_reads_per_cycle_stay_within_budget(kw, budget, monkeypatch):
    from host_reads import HostReads

    monkeypatch.setattr(Policy, "SHORTCUTS", ())  # top-k / top-p as on a GPU (the CPU's shortcuts read)
    base, prompt, _, _ = looping_reference()
    tl = TruncatedLlama(base, 2)
    with HostReads() as reads:
        _, s = speculative_generate(tl, prompt, 40, **plan(**kw), generator=torch.Generator().manual_seed(0))
    cycles = s["target_calls"]
    assert cycles >= 8
    assert reads.count <= budget * cycles + 3, (reads.count / cycles, dict(reads.where))  # + the root, prompt, stats


def test_host_reads_are_counted():
    """The counter sees each kind of read the loop could make (so a read slipped into the loop fails the test above)."""
    from host_reads import HostReads

    t = torch.arange(6.0)
    with HostReads() as reads:
        t[0].item(), int(t[1]), float(t[2]), bool(t[3] > 0), t.tolist(), t[t > 2], t.cpu(), torch.equal(t, t)
    assert reads.count == 8, dict(reads.where)
    with HostReads() as reads:
        (t * 2).argmax(), t[torch.tensor([1, 2])], t.to(torch.float64)
    assert reads.count == 0, dict(reads.where)


def test_device_rules_are_exact_without_host_reads(small_vocab_model, monkeypatch):
    """Top-k (ties kept by a masked sort) and top-p (the whole vocabulary sorted) as they run on a GPU: still exact."""
    monkeypatch.setattr(Policy, "SHORTCUTS", ())
    base, prompt = small_vocab_model
    tl = TruncatedLlama(base, 2)
    exact = exact_distribution(base, prompt, Policy(0.8, 0.9, 3))
    counts = empirical_counts(tl, prompt, SAMPLES, seed=5, gamma=2, temperature=0.8, top_p=0.9, top_k=3)
    assert counts[exact == 0].sum() == 0 and chi_square_pvalue(counts, exact) > 1e-3


@pytest.mark.parametrize("engine", ["lean", "hf"])
def test_the_prefill_computes_no_logits_unless_a_source_reads_them(engine):
    """The prompt's layers run without the final norm and head (their logits would be dropped: 2 GB for an 8k prompt
    and a 128k vocabulary), except for a source that learns from them (recycled predictions, auto); the tokens are
    the autoregressive ones either way."""
    base = make_tiny_llama(layers=4, seed=3)
    prompt = torch.randint(0, 259, (1, 20), generator=torch.Generator().manual_seed(1))
    ar, _ = autoregressive_generate(TruncatedLlama(base, 2, engine=engine), prompt, 12)
    drafts = ("exit", "lookup", "recycle", "auto") if engine == "lean" else ("exit", "lookup")
    for draft in drafts:
        tl = TruncatedLlama(base, 2, engine=engine)
        calls, real = [], tl.steps.verify

        def spy(h, cache, start, *a, head=True, **k):
            calls.append((h.shape[1], start, head))
            return real(h, cache, start, *a, head=head, **k)
        tl.steps.verify = spy
        generate.remember_costs(tl, 0.5, 1.0, {k: 1 + k / 10 for k in range(2, 16)})  # auto: no timing run in between
        out, _ = speculative_generate(tl, prompt, 12, **plan(draft=draft, gamma=2))
        assert torch.equal(out, ar), draft
        assert calls[0] == (19, 0, draft in ("recycle", "auto")), draft  # the prefill: 19 rows, head only if read
        assert all(head for _, start, head in calls[1:]), draft  # every later call is a verify whose logits count
