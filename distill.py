"""Distillation: the frozen base model's one pass feeds the exit, and the teacher is the same pass at full depth.

One forward of the frozen base under torch.no_grad() (TruncatedLlama.base_pass) gives the hidden state the draft
starts from and the teacher's logits; only the exit (ExitForward) keeps an autograd graph, so no backward pass goes
through the base and the teacher is never run twice. With --teacher_model_path the teacher is another model, run on
the same batch.

    distill_forward   one step's forward: (loss sum, per-row losses, labels), or (teacher, exit logits, labels)
    StateCache        the base pass's states on fixed blocks, kept (validation blocks; --cache_states)
    fit_head_lstsq    --head_init lstsq: the head from a closed-form fit (head_product: its last product, chunked)
    calibrate_scale   --calibrate: the logit temperature that best fits the teacher on one batch
    evaluate_exit     the validation metrics, reduced over processes
    float32_products  --tf32: TF32 for the run's float32 products on a GPU
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from data_utils import collate
from losses import exit_metric_sums, fused_head_loss, summarize_metrics, target_rows, token_losses


class StateCache:
    """The frozen base model's output on fixed blocks: the shared state the exit starts from and the full model's
    normed last state (which gives the teacher's logits), kept in memory after a block's first pass. Exact: these
    are the tensors a fresh pass computes. Used for the validation blocks (every validation after the first skips the
    base model) and, with --cache_states, for the training blocks (epochs after the first skip it). With `layers`
    (several exits' shared-layer counts), one pass keeps the state entering each of them, for all the exits.

    offload=True (--cache_states) keeps GPU states in host memory, pinned, and copies a batch's back when it is
    looked up. That cache grows with the data (an 8B model: 4 MiB per 256-token block, 40 GiB for 10k blocks) while
    the GPU also holds the base and the exit's optimizer states, so it lives where memory is plentiful; copying a
    batch back (8 x 256 blocks: 32 MiB, about 1 ms over PCIe from pinned memory) costs a few percent of the exit's
    step it saves a base pass for. Each batch's states are one pinned tensor, which torch's caching host allocator
    rounds up to a power of two (train.cache_bytes counts that). On a CPU nothing moves: the states stay as computed.
    """

    def __init__(self, layers=None, offload=False):
        self.states, self.layers, self.offload, self.device = {}, layers, offload, None

    def _keep(self, t):
        """t as the cache keeps it: a pinned host copy when offloading a GPU state, else t itself."""
        if not self.offload or t.device.type == "cpu":
            return t
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)

    def get(self, model, indices, batch):
        """(shared, final) for the blocks `indices` of `batch`: from the cache, or from one base pass (then stored)."""
        hit = self.lookup(indices, batch["input_ids"].shape[1], model.shared_layers)
        if hit is not None:
            return hit
        if self.layers is None:
            shared, final, _, _ = model.base_pass(batch["input_ids"], batch["attention_mask"])
            kept = {model.shared_layers: shared}
        else:
            p = model.base_pass(batch["input_ids"], batch["attention_mask"], all_hidden_states=True)
            kept, final = {s: p.hidden_states[s] for s in {*self.layers, model.shared_layers}}, p.final
        self.device, host_final = final.device, self._keep(final)
        for s, states in kept.items():
            host = self._keep(states)
            for j, i in enumerate(indices):
                self.states[i, s] = (host[j], host_final[j])
        return kept[model.shared_layers], final

    def lookup(self, indices, T, layer, remove=False):
        """(shared, final) for the blocks `indices` if all are cached (with T positions) for an exit after `layer`
        shared layers, else None; never runs the base model. remove=True drops them from the cache."""
        if not all((i, layer) in self.states and self.states[i, layer][0].shape[0] == T for i in indices):
            return None
        shared, final = zip(*((self.states.pop if remove else self.states.get)((i, layer)) for i in indices))
        to = lambda ts: torch.stack([t.to(self.device, non_blocking=True) for t in ts])  # no-op when not offloaded
        return to(shared), to(final)


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


@contextlib.contextmanager
def float32_products(device, tf32):
    """train.py --tf32: whether float32 matrix products on a CUDA `device` may run on TF32 tensor cores, while the
    block runs (the setting before is restored after). PyTorch's default is full float32 (IEEE), several times
    slower for the exit's head products, forward and backward. Nothing a run computes needs full float32: the lstsq
    fit sums and solves in float64, which TF32 never touches, and the state caches stay exact because fresh and cached
    passes, validation and a resumed run all compute under the one setting (resume with the same --tf32 for a
    bit-exact continuation). A CPU is left alone: its products stay as they were."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(tf32)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def batch_of(blocks, indices, pad_id, device):
    """The blocks `indices` of `blocks`, collated into one batch on `device`."""
    return {k: v.to(device) for k, v in collate([blocks[i] for i in indices], pad_id).items()}


def distill_forward(model, exit_forward, batch, teacher=None, loss=None, states=None, target=None):
    """One pass of the base model (no graph) and the exit (with its graph) on the positions that count.

    Position t predicts token t+1, so it counts when loss_mask[t+1] is 1. The teacher is the base model at full
    depth from the same pass, or the separate `teacher` model when one is given. `states`: the base pass's
    (shared, final) states when already known (StateCache, or one pass shared by several exits), so the base model is
    not run; `target`: the separate teacher's logits at the target positions, when already computed.
    Without `loss`: returns (teacher_logits (M, V), exit_logits (M, V), labels (M,)).
    With `loss` (fused_head_loss keywords, e.g. {"kind": "kl"}): returns (loss sum, per-row losses (M,), labels),
    computed without materialising any (M, V) tensor.
    """
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    rows = target_rows(batch)
    labels = input_ids[:, 1:][rows]
    if states is not None and (teacher is None or target is not None):
        shared, final = states
        ctx = model.context(shared, attention_mask)
    else:
        shared, final, ctx, _ = model.base_pass(input_ids, attention_mask, stop_at_shared=teacher is not None)
    with torch.no_grad():
        if teacher is None:
            target = (final[:, :-1][rows], model.base.lm_head.weight)
        elif target is None:
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
            mask, position_ids, pos = model.context(shared, batch["attention_mask"])
        else:
            shared, final, (mask, position_ids, pos), _ = model.base_pass(batch["input_ids"], batch["attention_mask"])
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
    head_product(W, M, out=exit.head.weight)
    return int(n.item())


def head_product(W, M, out, max_bytes=2**28):
    """out <- W M^T in float64 (then out's dtype), in row chunks whose float64 temporaries (W's rows as float64 and
    their product, 16 D bytes a row) take at most `max_bytes`: the whole product at once would be a V x D float64
    tensor, 8 GB at Llama-3.1-8B's 128256 x 4096. Each output row depends on its own row of W only, so the chunks
    give the unchunked product (up to float64 rounding where the BLAS blocks a smaller product differently)."""
    rows = max(1, max_bytes // (16 * W.shape[1]))
    for i in range(0, W.shape[0], rows):
        out[i:i + rows].copy_(W[i:i + rows].double() @ M.t())
    return out


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
