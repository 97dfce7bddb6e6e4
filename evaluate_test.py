"""The self-speculative loop: lossless (greedy and sampling), stats, EOS, bad values."""
import itertools

import pytest
import torch
from scipy.stats import chisquare

import evaluate
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
    for layer in (1, 3, 5):
        tl = TruncatedLlama(base, layer)
        ar, _ = autoregressive_generate(tl, prompt, new)
        assert torch.equal(ar, ref)
        for gamma in (1, 2, 4, 7, 100):  # 100 > max_new_tokens
            sp, stats = speculative_generate(tl, prompt, new, gamma=gamma)
            assert torch.equal(sp, ref), (layer, gamma)
            assert stats["cache_positions"] == [prompt.shape[1] + new - 1] * 6  # exactly the committed tokens


@pytest.mark.parametrize("kw", [dict(adapter="block"), dict(adapter="mlp"), dict(last_block=True),
                                dict(last_block=True, adapter="block")])
def test_greedy_lossless_with_trained_looking_exits(kw):
    base = make_tiny_llama(layers=5, init_std=0.2, seed=4)
    prompt = torch.randint(0, 259, (1, 6), generator=torch.Generator().manual_seed(1))
    tl = TruncatedLlama(base, 3, perturbed_exit(base, 3, **kw))
    ar, _ = autoregressive_generate(tl, prompt, 30)
    for gamma in (1, 3, 6):
        sp, stats = speculative_generate(tl, prompt, 30, gamma=gamma)
        assert torch.equal(sp, ar), (kw, gamma)
        assert stats["drafted"] > 0


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


def empirical_counts(tl, prompt, n, seed, length=3, **kw):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(VOCAB**length, dtype=torch.float64)
    for _ in range(n):
        tokens, _ = speculative_generate(tl, prompt, length, generator=g, **kw)
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


CASES = [  # (temperature, top_p, top_k, exit layer, gamma): three tokens cover rejections at 1 and 2 and the bonus
    (1.0, 1.0, 0, 1, 2),
    (0.7, 1.0, 0, 2, 1),
    (1.3, 0.8, 0, 1, 3),
    (1.0, 0.9, 3, 2, 2),
]


@pytest.mark.parametrize("temperature,top_p,top_k,layer,gamma", CASES)
def test_sampling_matches_target_distribution(small_vocab_model, temperature, top_p, top_k, layer, gamma):
    base, prompt = small_vocab_model
    tl = TruncatedLlama(base, layer)
    exact = exact_distribution(base, prompt, Policy(temperature, top_p, top_k))
    counts = empirical_counts(tl, prompt, SAMPLES, seed=11, gamma=gamma, temperature=temperature,
                              top_p=top_p, top_k=top_k)
    assert counts[exact == 0].sum() == 0, "sampled a sequence the policy forbids"
    assert chi_square_pvalue(counts, exact) > 1e-3


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


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stats_invariants(temperature):
    base = make_tiny_llama(layers=4, init_std=0.2, seed=5)
    prompt = torch.randint(0, 259, (1, 5), generator=torch.Generator().manual_seed(2))
    tl = TruncatedLlama(base, 2, perturbed_exit(base, 2, adapter="block"))
    gamma = 3
    tokens, s = speculative_generate(tl, prompt, 40, gamma=gamma, temperature=temperature, top_p=0.9,
                                     generator=torch.Generator().manual_seed(0))
    assert s["new_tokens"] == len(tokens) == 40
    assert 0 <= s["accepted"] <= s["drafted"]
    assert sum(s["accept_hist"]) == s["target_calls"] == len(s["per_cycle"])
    assert sum(k * c for k, c in enumerate(s["accept_hist"])) == s["accepted"]
    assert s["avg_accepted"] == pytest.approx(s["accepted"] / s["target_calls"])
    assert s["acceptance_rate"] == pytest.approx(s["accepted"] / s["drafted"])
    assert 0 <= s["avg_overlap"] <= 1 and s["avg_tv"] == pytest.approx(1 - s["avg_overlap"])
    assert sum(s["from_draft"]) == s["accepted"]
    # each cycle drafts min(gamma, tokens still needed - 1): the cycles add up to exactly 40 tokens
    assert s["accepted"] + s["target_calls"] == 40
    assert s["tokens_per_s"] > 0 and s["seconds"] > 0


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
])
def test_bad_values_raise_one_clear_sentence(kw, flag):
    tl = TruncatedLlama(make_tiny_llama(layers=2), 1)
    with pytest.raises(ValueError, match=flag) as e:
        speculative_generate(tl, torch.tensor([[1, 2]]), 4, **kw)
    assert str(e.value).count(".") >= 1 and "\n" not in str(e.value)


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
