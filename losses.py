"""The exit's training losses and validation metrics, shared by train.py and evaluate.py's teacher-forced sweep.

- token_losses / exit_metric_sums / exit_metrics: per-row losses and metrics from materialised (M, V) logits.
- fused_head_loss: the same losses for exit logits x @ W^T without materialising any (M, V) tensor, with
  hand-written gradients (what a training step uses: on a CPU the full-size temporaries cost more than the
  arithmetic).
"""
import math

import torch
import torch.nn.functional as F

LOSSES = ("kl", "ce", "kl+ce", "tv")


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
    The products are float32 (TF32 on a GPU under train.py --tf32 on: distill.float32_products); the loss and its
    gradient are then computed from them in float32.
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


def target_rows(batch):
    """(B, T-1) bool: position t counts when token t+1 is a target (loss_mask) and position t is not padding."""
    return batch["loss_mask"][:, 1:].bool() & batch["attention_mask"][:, :-1].bool()
