"""The losses and metrics (losses.py), by hand: KL, CE, TV, top-1, overlap, a pruned head's, and the fused head loss
against autograd."""
import math

import pytest
import torch
import torch.nn.functional as F

import losses


def test_metrics_by_hand():
    # two-token vocab: p = (0.5, 0.5), q = (0.75, 0.25)
    p = torch.log(torch.tensor([[0.5, 0.5]]))
    q = torch.log(torch.tensor([[0.75, 0.25]]))
    m = losses.exit_metrics(p, q, labels=torch.tensor([1]))
    assert m["overlap_t1"] == pytest.approx(0.75)
    assert m["kl"] == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert m["exit_ppl"] == pytest.approx(4.0)
    assert m["teacher_ppl"] == pytest.approx(2.0)
    # T = 0.7 sharpens both: compare with the formula
    p7, q7 = torch.softmax(p / 0.7, -1), torch.softmax(q / 0.7, -1)
    assert m["overlap_t07"] == pytest.approx(float(torch.minimum(p7, q7).sum()))
    same = losses.exit_metrics(q, q)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1"] == 1.0 and same["overlap_t1"] == pytest.approx(1.0)
    assert "exit_ppl" not in same


def test_metrics_mask_and_top1():
    torch.manual_seed(0)
    t = torch.randn(2, 5, 11)
    e = t.clone()
    e[0, 1] = -t[0, 1]  # disagree at one position
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :2] = True  # count positions (0,0) and (0,1) only
    m = losses.exit_metrics(t, e, mask)
    assert m["tokens"] == 2 and m["top1"] == 0.5
    assert losses.exit_metrics(t, e)["top1"] == pytest.approx(9 / 10)
    # sums over pieces equal the whole
    s1, s2 = losses.exit_metric_sums(t[:1], e[:1]), losses.exit_metric_sums(t[1:], e[1:])
    whole = losses.exit_metrics(t, e)
    merged = losses.summarize_metrics({k: s1[k] + s2[k] for k in s1})
    assert merged == pytest.approx(whole)


def test_losses():
    torch.manual_seed(0)
    t, e, y = torch.randn(7, 13), torch.randn(7, 13), torch.randint(0, 13, (7,))
    kl1 = F.kl_div(F.log_softmax(e, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(losses.token_losses(t, e, kind="kl"), kl1, atol=1e-6)
    kl2 = F.kl_div(F.log_softmax(e / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(losses.token_losses(t, e, kind="kl", temperature=2.0), 4 * kl2, atol=1e-6)
    ce = F.cross_entropy(e, y, reduction="none")
    assert torch.allclose(losses.token_losses(t, e, y, kind="ce"), ce, atol=1e-6)
    assert torch.allclose(losses.token_losses(t, e, y, kind="kl+ce", ce_weight=0.3), kl1 + 0.3 * ce, atol=1e-6)
    tv = losses.token_losses(t, e, kind="tv")
    overlap = losses.exit_metric_sums(t, e)["overlap_t1"]
    assert float(tv.sum()) == pytest.approx(7 - overlap, abs=1e-5)
    assert float(losses.token_losses(t, t, kind="tv").abs().max()) < 1e-6


@pytest.mark.parametrize("kind", losses.LOSSES)
@pytest.mark.parametrize("teacher_as_logits", [False, True])
@pytest.mark.parametrize("pruned", [False, True])
def test_fused_head_loss_matches_autograd(kind, teacher_as_logits, pruned):
    torch.manual_seed(0)
    M, D, V = 37, 8, 29
    vocab = torch.randperm(V)[:11].sort().values if pruned else None  # a pruned head: 11 rows
    x = torch.randn(M, D, requires_grad=True)
    W = torch.randn(V if vocab is None else 11, D, requires_grad=True)
    tx, tW = torch.randn(M, D), torch.randn(V, D)
    y = torch.randint(0, V, (M,))
    ref = losses.token_losses(tx @ tW.t(), x @ W.t(), y, kind=kind, temperature=1.7, ce_weight=0.3, vocab=vocab)
    gx, gW = torch.autograd.grad(ref.sum() * 0.5, (x, W))
    teacher = tx @ tW.t() if teacher_as_logits else (tx, tW)
    total, rows = losses.fused_head_loss(x, W, teacher, y, kind=kind, temperature=1.7, ce_weight=0.3,
                                         block=16, chunk=3, vocab=vocab)
    assert torch.allclose(rows, ref, atol=1e-5) and torch.allclose(total, ref.sum(), atol=1e-4)
    fx, fW = torch.autograd.grad(total * 0.5, (x, W))
    assert torch.allclose(fx, gx, atol=1e-5) and torch.allclose(fW, gW, atol=1e-5)


def test_pruned_head_losses_and_metrics_by_hand():
    """A pruned head (q = 0 outside its tokens S): kl is p(S) KL(p_S || q), i.e. the full KL's terms inside S;
    tv is 1 - the overlap with the full teacher; ce skips labels outside S. Metrics stay against the full teacher."""
    torch.manual_seed(1)
    M, V = 9, 13
    t, z = torch.randn(M, V) * 2, torch.randn(M, V) * 2
    vocab = torch.tensor([0, 3, 4, 8, 12])
    full_q = torch.full((M, V), float("-inf"))
    full_q[:, vocab] = z[:, vocab]  # what EarlyExit.logits returns for this head
    y = torch.tensor([0, 1, 3, 4, 5, 8, 12, 2, 3])
    for temp in (1.0, 0.6):
        log_p = F.log_softmax(t / temp, -1)
        log_q = F.log_softmax(full_q / temp, -1)
        inside = (log_p.exp() * (log_p - log_q))[:, vocab].sum(-1)  # the finite terms of the forward KL
        mass = log_p.exp()[:, vocab].sum(-1)
        kl = losses.token_losses(t, full_q, kind="kl", temperature=temp, vocab=vocab)
        assert torch.allclose(kl, temp ** 2 * (inside - mass * mass.log()), atol=1e-5)
        assert torch.allclose(kl, losses.token_losses(t, z[:, vocab], kind="kl", temperature=temp, vocab=vocab))
    # a "pruned" head over every token (in any order) is the full head
    every = torch.randperm(V)
    for kind in ("kl", "tv"):
        assert torch.allclose(losses.token_losses(t, z[:, every], kind=kind, vocab=every),
                              losses.token_losses(t, z, kind=kind), atol=1e-5)
    tv = losses.token_losses(t, full_q, kind="tv", vocab=vocab)
    sums = losses.exit_metric_sums(t, full_q, labels=y)
    assert float(tv.sum()) == pytest.approx(M - sums["overlap_t1"], abs=1e-5)
    ce = losses.token_losses(t, full_q, y, kind="ce", vocab=vocab)
    covered = torch.isin(y, vocab)
    assert torch.all(ce[~covered] == 0)
    assert torch.allclose(ce[covered], F.cross_entropy(full_q[covered], y[covered], reduction="none"))
    # metrics: finite, kl is the training loss, perplexity over the covered labels, top-1 against the full teacher
    assert sums["kl"] == pytest.approx(float(losses.token_losses(t, full_q, kind="kl", vocab=vocab).sum()), abs=1e-4)
    assert sums["vocab_mass"] == pytest.approx(float(F.softmax(t, -1)[:, vocab].sum()), abs=1e-5)
    assert sums["exit_nll_tokens"] == int(covered.sum()) and math.isfinite(sums["exit_nll"])
    assert sums["top1"] == float((t.argmax(-1) == full_q.argmax(-1)).sum())
    m = losses.summarize_metrics(sums)
    assert m["exit_ppl"] == pytest.approx(math.exp(float(ce[covered].mean())), rel=1e-5)
    assert losses.exit_metrics(t, z)["vocab_mass"] == 1.0  # a full head
