"""The distillation pieces (distill.py): one base pass and no graph through the base, the fused loss equal to autograd,
calibration, the least-squares head, the loss decreasing on a fixed batch."""
import pytest
import torch

import distill
import losses
import train
from conftest import make_tiny_llama
from truncated_llama import TruncatedLlama
from tuned_llama import EarlyExit


def _tiny_batch(B=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 259, (B, T), generator=g)
    loss_mask = torch.ones(B, T, dtype=torch.long)
    loss_mask[:, :4] = 0
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": loss_mask}


@pytest.mark.parametrize("parts", [["head"], ["head", "norm", "adapter"], ["norm", "last_block"]])
def test_one_base_pass_and_no_base_graph(parts):
    base = make_tiny_llama(layers=4, seed=1, init_std=0.3)
    reference = {k: v.clone() for k, v in base.state_dict().items()}
    exit = train.set_trainable(EarlyExit(base, 2, adapter="block" if "adapter" in parts else None,
                                         last_block="last_block" in parts), parts)
    model = TruncatedLlama(base, 2, exit)
    calls = []
    for i, layer in enumerate(base.model.layers):
        layer.register_forward_hook(lambda *_, i=i: calls.append(i))
    batch = _tiny_batch()
    t, e, y = distill.distill_forward(model, distill.ExitForward(exit), batch)
    # one pass: each base layer ran exactly once (the exit's private blocks are copies, not base layers)
    assert sorted(calls) == [0, 1, 2, 3]
    # the teacher is the full model, the draft the exit, at the positions whose next token is a target
    rows = batch["loss_mask"][:, 1:].bool()
    with torch.no_grad():
        full = model(batch["input_ids"])
    assert torch.allclose(t, full.logits[:, :-1][rows], atol=1e-5)
    assert torch.allclose(e, full.exit_logits[:, :-1][rows], atol=1e-5)
    assert torch.equal(y, batch["input_ids"][:, 1:][rows])
    assert not t.requires_grad and e.requires_grad
    losses.token_losses(t, e, kind="kl").mean().backward()
    assert all(p.grad is None for p in base.parameters())
    reference_grads = {n: p.grad.clone() for n, p in exit.named_parameters() if p.grad is not None}
    exit.zero_grad(set_to_none=True)
    calls.clear()
    total, per_row, _ = distill.distill_forward(model, distill.ExitForward(exit), batch, loss={"kind": "kl"})
    (total / per_row.numel()).backward()
    assert sorted(calls) == [0, 1, 2, 3] and all(p.grad is None for p in base.parameters())
    fused_grads = {n: p.grad for n, p in exit.named_parameters() if p.grad is not None}
    assert fused_grads.keys() == reference_grads.keys()
    assert all(torch.allclose(fused_grads[n], g, atol=1e-5) for n, g in reference_grads.items())
    trained = {n for n, p in exit.named_parameters() if p.grad is not None}
    prefixes = {"head": "head.", "norm": "norm.", "adapter": "adapter.", "last_block": "last_block."}
    assert trained == {n for n, _ in exit.named_parameters() if any(n.startswith(prefixes[q]) for q in parts)}
    assert all(torch.equal(v, reference[k]) for k, v in base.state_dict().items())


def test_pruned_head_one_pass_fused_equals_autograd():
    """A pruned exit through distill_forward: full-vocabulary logits (-inf outside), and the fused loss's gradients
    equal autograd's through token_losses; the calibration and the lstsq fit work on its K rows."""
    base = make_tiny_llama(layers=4, seed=1, init_std=0.3)
    vocab = torch.arange(0, 259, 2)
    exit = train.set_trainable(EarlyExit(base, 2, adapter="block", vocab=vocab), ["head", "norm", "adapter"])
    model, ef = TruncatedLlama(base, 2, exit), distill.ExitForward(exit)
    batch = _tiny_batch()
    for kind in ("kl", "kl+ce", "tv", "ce"):
        t, e, y = distill.distill_forward(model, ef, batch)
        assert e.shape == t.shape and torch.isneginf(e[:, 1::2]).all() and torch.isfinite(e[:, vocab]).all()
        losses.token_losses(t, e, y, kind=kind, temperature=1.5, vocab=vocab).sum().backward()
        want = {n: p.grad.clone() for n, p in exit.named_parameters() if p.grad is not None}
        exit.zero_grad(set_to_none=True)
        distill.distill_forward(model, ef, batch, loss={"kind": kind, "temperature": 1.5})[0].backward()
        got = {n: p.grad for n, p in exit.named_parameters() if p.grad is not None}
        assert got.keys() == want.keys() and exit.head.weight.grad.shape == (130, 32)
        assert all(torch.allclose(got[n], g, atol=1e-5) for n, g in want.items()), kind
        exit.zero_grad(set_to_none=True)
    tau = distill.calibrate_scale(model, ef, _tiny_batch(B=2, T=24))
    assert 0.2 < tau < 20
    # lstsq: the pruned head is the full fitted head's rows
    batches = [_tiny_batch(B=2, T=24, seed=s) for s in range(2)]
    full, pruned = EarlyExit(base, 2, head_init="lstsq"), EarlyExit(base, 2, head_init="lstsq", vocab=vocab)
    distill.fit_head_lstsq(TruncatedLlama(base, 2, full), full, batches, _OneProcess())
    distill.fit_head_lstsq(TruncatedLlama(base, 2, pruned), pruned, batches, _OneProcess())
    assert torch.allclose(pruned.head.weight, full.head.weight[vocab], atol=1e-6)


def test_calibrate_scale_lowers_kl():
    base = make_tiny_llama(layers=4, seed=1, init_std=0.3)
    exit = EarlyExit(base, 2)
    model, ef = TruncatedLlama(base, 2, exit), distill.ExitForward(exit)
    batch = _tiny_batch(B=2, T=24)
    tau = distill.calibrate_scale(model, ef, batch)
    t, e, _ = distill.distill_forward(model, ef, batch)
    assert 0.2 < tau < 20
    assert losses.exit_metrics(t, e / tau)["kl"] <= losses.exit_metrics(t, e)["kl"] + 1e-6
    assert losses.exit_metrics(t, e / tau)["kl"] <= min(losses.exit_metrics(t, e / s)["kl"] for s in (0.5, 2, 4)) + 1e-6


class _OneProcess:
    num_processes = 1


def test_lstsq_head():
    base = make_tiny_llama(layers=4, seed=1, init_std=0.3)
    batches = [_tiny_batch(B=2, T=24, seed=s) for s in range(3)]
    # an exit whose normed state IS the full model's (layer 3 + a copy of block 3): the map is the identity
    exit = EarlyExit(base, 3, adapter="block", adapter_init="next")
    n = distill.fit_head_lstsq(TruncatedLlama(base, 3, exit), exit, batches, _OneProcess())
    assert n == 3 * 2 * 20  # 24 positions, the first 4 tokens are not targets
    W = base.lm_head.weight
    assert float((exit.head.weight - W).detach().abs().max()) < 0.02 * float(W.detach().abs().max())
    # a middle exit: the fitted head agrees with the full model better than the copied one on the fitted data
    copied = EarlyExit(base, 2)
    fitted = EarlyExit(base, 2, head_init="lstsq")
    assert torch.equal(fitted.head.weight, copied.head.weight)  # lstsq starts as the copy
    distill.fit_head_lstsq(TruncatedLlama(base, 2, fitted), fitted, batches, _OneProcess())
    kl = lambda e: sum(losses.exit_metrics(*distill.distill_forward(TruncatedLlama(base, 2, e), distill.ExitForward(e),
                                                                 b)[:2])["kl"] for b in batches)
    assert kl(fitted) < 0.8 * kl(copied)


@pytest.mark.parametrize("kind", losses.LOSSES)
def test_loss_decreases_on_fixed_batch(kind):
    torch.manual_seed(0)
    base = make_tiny_llama(layers=4, seed=2, init_std=0.3)
    exit = train.set_trainable(EarlyExit(base, 2, adapter="block"), ["head", "norm", "adapter"])
    model = TruncatedLlama(base, 2, exit)
    ef = distill.ExitForward(exit)
    opt = torch.optim.AdamW([p for p in exit.parameters() if p.requires_grad], lr=3e-3)
    batch = _tiny_batch(B=4, T=24)
    losses = []
    for _ in range(40):
        total, per_row, _ = distill.distill_forward(model, ef, batch, loss={"kind": kind})
        loss = total / per_row.numel()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_head_product_in_chunks_equals_the_whole_product():
    """--head_init lstsq's last product W M^T in row chunks (bounded float64 temporaries) is the one-shot product."""
    g = torch.Generator().manual_seed(0)
    W, M = torch.randn(259, 32, generator=g).bfloat16(), torch.randn(32, 32, generator=g, dtype=torch.float64)
    whole = W.double() @ M.t()
    chunked = distill.head_product(W, M, torch.empty(259, 32, dtype=torch.float64), max_bytes=16 * 32 * 50)  # 6 chunks
    torch.testing.assert_close(chunked, whole, rtol=1e-13, atol=1e-13)  # float64 rounding
    one_ulp = dict(rtol=2.0 ** -23, atol=0)  # in float32 (the exit head), at most the last bit differs
    torch.testing.assert_close(distill.head_product(W, M, torch.empty(259, 32), max_bytes=16 * 32 * 50),
                               whole.float(), **one_ulp)


def test_offloading_state_cache_returns_the_fresh_pass():
    """StateCache(offload=True), as --cache_states uses it: on a CPU the states stay where computed, and a lookup
    (the blocks in another order and grouping) gives a fresh base pass's tensors."""
    base = make_tiny_llama(layers=4, seed=1, init_std=0.3)
    model = TruncatedLlama(base, 2, EarlyExit(base, 2))
    batch = _tiny_batch(B=3, T=10)
    cache = distill.StateCache(offload=True)
    with torch.no_grad():
        cache.get(model, [4, 5, 6], batch)
        shared, final, _, _ = model.base_pass(batch["input_ids"], batch["attention_mask"])
    hit = cache.lookup([6, 4], 10, model.shared_layers)
    assert all(t.device.type == "cpu" for pair in cache.states.values() for t in pair)
    assert torch.equal(hit[0], shared[[2, 0]]) and torch.equal(hit[1], final[[2, 0]])


def test_tf32_is_set_for_a_cuda_run_only_and_restored():
    """--tf32 sets TF32 for float32 products on a CUDA device while the run lasts; a CPU run is left alone."""
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    before = flags()
    for tf32 in (True, False):
        with distill.float32_products(torch.device("cuda"), tf32):
            assert flags() == (tf32, tf32)
        assert flags() == before
    with distill.float32_products(torch.device("cpu"), not before[0]):
        assert flags() == before
