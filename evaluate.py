"""Self-speculative decoding: a KV-cached draft/verify loop on one shared model, and the sweep that measures it.

The loop (batch size 1, like gpt-fast's):

    cache holds positions [0, n) in every layer; `last` is the newest committed token, not yet in the cache
    draft:   feed last, d1, .., d(g-1) through the shared layers + exit, one token at a time -> q1..qg, d1..dg
             feed dg through the shared layers too (its layer-L state is all verification still needs)
             (with draft_stop P: stop at the first q_j whose top probability is below P; g = j - 1 drafts)
    verify:  the remaining layers on the g+1 saved layer-L states at positions n..n+g   -> p1..p(g+1)
    accept:  k drafts by the speculative-sampling rule, then one token from the target (correction or bonus)
    commit:  crop every layer back to n+k+1 positions; last = the target's token

No layer ever recomputes a position, and after each cycle the cache holds exactly the committed tokens.

The sweep (`python evaluate.py --help`) runs the loop over a grid of cells (exit, layer L, gamma, policy) on a set of
prompts, each against an autoregressive baseline on the same prompts, policy and seeds, and writes to --out_dir:

    results.jsonl        one line per cell: the loop's stats over all prompts, tokens/s, speedup, c, predicted speedup
    summary.csv/.md      the same as a table
    layer_sweep.jsonl/.csv  teacher-forced metrics of every exit at every layer, from one pass per batch of text
    *.png                the plots, among them where_it_pays.png: the (a, c) map with break-even curves

    python evaluate.py --exit_layers 8 15 22 --exit_ckpt out/exit --gammas 2 4 --temperatures 0 0.7
    torchrun --nproc_per_node 2 evaluate.py ...     # cells split across processes (accelerate launch on GPUs)
    python evaluate.py ... --resume                 # after an interruption: skips every finished cell
    python evaluate.py --best_line OUT_DIR          # the best lossless speedup of a finished sweep (its last line)
"""
import argparse
import csv
import hashlib
import io
import itertools
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
from data_utils import (DataError, Parser, SignalStop, UsageError, check_context, int_at_least, run_command,
                        sample_blocks)
from losses import exit_metric_sums, summarize_metrics, target_rows
from truncated_llama import DEFAULT_MODEL, DTYPE_CHOICES, ENGINES, ModelLoadError
from tuned_llama import CheckpointError

# ----------------------------------------------------------------------------------------------------------------
# The sampling policy


SWEEP_FLAGS = {"gamma": "--gammas", "temperature": "--temperatures", "top_p": "--top_p", "top_k": "--top_k",
               "draft_stop": "--draft_stop"}


def check_policy(*, gamma=1, temperature=0.0, top_p=1.0, top_k=0, draft_stop=0.0, flags=SWEEP_FLAGS):
    """Raise ValueError (one sentence, naming the command-line flag from `flags`) for values the loop cannot use."""
    if not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"{flags['gamma']}: gamma (the draft length) must be an integer >= 1, got {gamma}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{flags['temperature']}: temperature must be a number >= 0 (0 means greedy), "
                         f"got {temperature}.")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"{flags['top_p']}: top_p must be in (0, 1], got {top_p}.")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"{flags['top_k']}: top_k must be an integer >= 0 (0 disables it), got {top_k}.")
    if not (isinstance(draft_stop, (int, float)) and 0 <= draft_stop < 1):
        raise ValueError(f"{flags.get('draft_stop', '--draft_stop')}: draft_stop must be in [0, 1) (0 turns it off), "
                         f"got {draft_stop}.")


class Policy:
    """How logits become a next-token distribution: temperature, then top-k, then top-p (transformers' order and
    rules: top-k keeps every token tied with the k-th; top-p keeps the smallest set of most likely tokens whose mass
    reaches top_p). Temperature 0 means greedy; its `probs` are the plain temperature-1 softmax.

    Sorting a 49,152-token vocabulary for top-p costs 3 ms on a CPU, a tenth of a decode step, and the speculative
    loop needs it for every draft and every verified position. So top-p looks at the most likely candidates first
    (torch.topk) and sorts the whole vocabulary only when they hold less than top_p of the mass: the same set."""

    CANDIDATES = (64, 1024)  # top-p's first looks; then the whole vocabulary

    def __init__(self, temperature=0.0, top_p=1.0, top_k=0):
        check_policy(temperature=temperature, top_p=top_p, top_k=top_k)
        self.greedy = temperature == 0
        self.temperature = float(temperature)
        self.top_k = top_k if not self.greedy else 0
        self.top_p = float(top_p) if not self.greedy else 1.0

    def probs(self, logits):
        """(k, V) logits -> (k, V) float32 probabilities under this policy."""
        scores = logits.float()
        if not self.greedy and self.temperature != 1.0:
            scores = scores / self.temperature
        if not self.top_k and self.top_p >= 1.0:
            return torch.softmax(scores, dim=-1)
        values, index = self._nucleus(scores)
        return torch.zeros_like(scores).scatter_(-1, index, torch.softmax(values, dim=-1))

    def _nucleus(self, scores):
        """The kept tokens' scores (-inf where dropped) and their ids, most likely first."""
        vocab = scores.shape[-1]
        if self.top_k:
            values, index = scores.topk(min(self.top_k, vocab), dim=-1)
            if (scores >= values[:, -1:]).sum() > values.numel():  # ties with the k-th token: keep them all
                values, index = scores.masked_fill(scores < values[:, -1:], float("-inf")).sort(-1, descending=True)
            log_total = values.logsumexp(-1, keepdim=True)
        else:
            log_total = scores.logsumexp(-1, keepdim=True)
        if self.top_p >= 1.0:
            return values, index
        for n in self.CANDIDATES + (vocab,):
            if not self.top_k:
                values, index = scores.topk(n, dim=-1) if n < vocab else scores.sort(-1, descending=True)
            mass = (values - log_total).exp()
            if self.top_k or n >= vocab or bool((mass.sum(-1) >= self.top_p).all()):
                break
        above = mass.cumsum(-1) - mass  # the mass of the tokens more likely than each
        drop = above >= self.top_p
        drop[:, 0] = False
        return values.masked_fill(drop, float("-inf")), index

    def pick(self, logits, generator=None):
        """One token id per row: argmax when greedy, else a sample from `probs`."""
        if self.greedy:
            return logits.argmax(-1)
        return sample(self.probs(logits), generator)

    def draft_token(self, logits, q, generator=None):
        """The draft's token from its (1, V) logits and their probabilities q: argmax, or a sample from q."""
        return int(logits.argmax(-1) if self.greedy else sample(q, generator))

    def accepted(self, p_logits, p, q, drafts, generator=None):
        """How many drafts the target accepts, in order: while each equals argmax p (greedy), or by the
        speculative-sampling rule (one uniform draw per judged draft, stopping at the first rejection)."""
        target = p_logits[: len(drafts)].argmax(-1).tolist() if self.greedy else None
        for j, x in enumerate(drafts):
            ok = x == target[j] if self.greedy else accept_draft(p[j, x], q[j, x], generator)
            if not ok:
                return j
        return len(drafts)

    def target_token(self, p_logits, p, q, k, generator=None):
        """The target's own token after k accepted drafts: argmax p (greedy); else the correction from
        normalise(max(0, p - q)) at a rejection, or the bonus token from p when every draft was accepted."""
        if self.greedy:
            return int(p_logits[k].argmax())
        rejected = q is not None and k < q.shape[0]
        return int(sample(residual_distribution(p[k], q[k]) if rejected else p[k], generator))


def sample(probs, generator=None):
    """One token id per row of `probs` (rows summing to 1, or to any positive total), drawn by inverting the
    cumulative distribution with one uniform number: what torch.multinomial does for one draw, at a twentieth of its
    cost on a 49,152-token row. A token of probability 0 is never drawn."""
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device, dtype=cdf.dtype)
    picked = torch.searchsorted(cdf, u * cdf[..., -1:], right=True).squeeze(-1)
    last = probs.shape[-1] - 1
    if bool((picked > last).any()):  # u * total rounded up to the total: the last token with mass
        top = last - (probs.flip(-1) > 0).int().argmax(-1)
        picked = torch.where(picked > last, top, picked)
    return picked


def accept_draft(p_x, q_x, generator=None):
    """Accept a draft token x (sampled from q) with probability min(1, p(x) / q(x))."""
    u = torch.rand((), generator=generator, device=q_x.device)
    return bool(u * q_x < p_x)


def residual_distribution(p, q):
    """Where to sample after a rejection: normalise(max(0, p - q)); p itself if q covers p everywhere."""
    r = torch.clamp(p - q, min=0)
    total = r.sum()
    return r / total if total > 0 else p


# ----------------------------------------------------------------------------------------------------------------
# The loops


def _check_prompt(model, input_ids, max_new_tokens):
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape (1, T) with T >= 1, got {tuple(input_ids.shape)}.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be an integer >= 1, got {max_new_tokens}.")
    check_context(model.config, "--max_new_tokens", max_new_tokens, prompt=input_ids.shape[1])  # a ValueError


def _prefill(model, input_ids, with_exit, room=0):
    """All prompt tokens but the last go into every layer's cache; the last one is fed by the first step.
    `room`: positions the generation will add (the lean engine reserves them up front)."""
    cache = model.new_cache(input_ids.shape[1] + room)
    if input_ids.shape[1] > 1:
        model.full_step(input_ids[:, :-1], cache, 0, with_exit=with_exit)
    return cache, input_ids.shape[1] - 1, input_ids[:, -1:]


def _finish(tokens, stats, t0, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats["seconds"] = time.perf_counter() - t0
    stats["new_tokens"] = len(tokens)
    stats["tokens_per_s"] = len(tokens) / stats["seconds"] if stats["seconds"] > 0 else 0.0
    return torch.tensor(tokens, dtype=torch.long), stats


@torch.inference_mode()
def autoregressive_generate(model, input_ids, max_new_tokens, *, temperature=0.0, top_p=1.0, top_k=0,
                            eos_token_id=None, generator=None):
    """The full model, one token per step, same cache and policy as the speculative loop. Returns (tokens, stats)."""
    _check_prompt(model, input_ids, max_new_tokens)
    policy = Policy(temperature, top_p, top_k)
    t0 = time.perf_counter()
    cache, n, last = _prefill(model, input_ids, with_exit=False, room=max_new_tokens)
    tokens = []
    while len(tokens) < max_new_tokens:
        logits = model.full_step(last, cache, n)[0, -1:]
        tok = policy.pick(logits, generator)
        tokens.append(int(tok))
        n += 1
        last = tok.view(1, 1)
        if eos_token_id is not None and tokens[-1] in _as_set(eos_token_id):
            break
    return _finish(tokens, {"target_calls": len(tokens)}, t0, input_ids.device)


def _as_set(eos):
    return set(eos) if isinstance(eos, (list, tuple, set)) else {eos}


class Cycle(NamedTuple):
    """One draft-verify cycle: the drafted tokens, how many the target accepted, the target's own token, and the
    sum over drafted positions of sum_x min(p, q) (their expected acceptance)."""
    drafts: list
    accepted: int
    token: int
    overlap: float


def draft(model, policy, cache, n, last, g, draft_stop=0.0, generator=None):
    """Up to g draft tokens after `last` (positions n..), one at a time through the shared layers and the exit.
    Returns (the layer-L states of `last` and of every draft, to verify; the drafts' q rows; the drafts). With
    `draft_stop`, drafting ends when the draft's top probability falls below it."""
    hidden, q_rows, drafts, tok = [], [], [], last
    for j in range(g):
        h, logits = model.draft_step(tok, cache, n + j)
        hidden.append(h)
        q_j = policy.probs(logits[0, -1:])  # computed once: sampled from now, compared with p later
        if draft_stop and float(q_j.max()) < draft_stop:
            return hidden, q_rows, drafts  # `tok` already went through the shared layers (h), as verify needs
        q_rows.append(q_j)
        drafts.append(policy.draft_token(logits[0, -1:], q_j, generator))
        tok = torch.tensor([[drafts[-1]]], device=last.device)
    h, _ = model.extend(tok, cache, n + g)  # the last draft token's shared layers (and exit blocks)
    return hidden + [h], q_rows, drafts


def speculate_cycle(model, policy, cache, n, last, g, draft_stop=0.0, generator=None):
    """Draft up to g tokens, verify them with the remaining layers in one pass, accept some: one Cycle. The cache
    then holds positions up to n + drafts; the caller crops it to what it commits."""
    hidden, q_rows, drafts = draft(model, policy, cache, n, last, g, draft_stop, generator)
    p_logits = model.verify(torch.cat(hidden, dim=1), cache, n)[0]
    p = policy.probs(p_logits)
    q = torch.cat(q_rows) if q_rows else None
    overlap = torch.minimum(p[: len(drafts)], q).sum().item() if drafts else 0.0
    k = policy.accepted(p_logits, p, q, drafts, generator)
    return Cycle(drafts, k, policy.target_token(p_logits, p, q, k, generator), overlap)


@torch.inference_mode()
def speculative_generate(model, input_ids, max_new_tokens, *, gamma, temperature=0.0, top_p=1.0, top_k=0,
                         eos_token_id=None, generator=None, draft_stop=0.0):
    """Self-speculative decoding with `model` (a TruncatedLlama). Returns (new tokens, stats).

    Lossless: greedy returns exactly the autoregressive tokens; sampling returns exactly the target's distribution
    under the policy (temperature, then top-k, then top-p, applied alike to target p and draft q). A draft token x is
    accepted with probability min(1, p(x)/q(x)); the first rejection samples from normalise(max(0, p - q)); when all
    are accepted a bonus token is sampled from the next p. Greedy accepts while the draft equals argmax p.

    Adaptive draft length (`draft_stop` P in (0, 1); 0 = off): gamma is then a cap, and a cycle stops drafting as soon
    as the draft is unsure: when the largest probability of its next-token distribution q falls below P, that token
    is not drafted and verification starts. q is the distribution the draft samples from and the rule compares with p:
    the policy's (temperature, top-k, top-p) when sampling, the temperature-1 softmax when greedy. The stop depends
    on q alone, never on p, so it is a choice the draft could have made by itself and the output stays exact (the
    draft step that decided to stop already ran that token through the shared layers: verification reuses it).

    stats: new_tokens, target_calls (verification passes), drafted, accepted, avg_accepted (accepted drafts per
    target call), acceptance_rate (accepted / drafted), avg_overlap (mean over all drafted positions, accepted or
    not, of sum_x min(p, q), the expected acceptance probability; for greedy, p and q are the temperature-1
    softmaxes), avg_tv (1 - avg_overlap), accept_hist (cycles that accepted 0..gamma drafts), draft_len_hist (cycles
    that drafted 0..gamma tokens), avg_draft_len (drafted / target calls), rejected (cycles that rejected a draft),
    seconds, tokens_per_s, and per_cycle (accepted count of each cycle), per_cycle_drafted (drafted count of each
    cycle) and from_draft (per new token: came from the draft).
    """
    check_policy(gamma=gamma, temperature=temperature, top_p=top_p, top_k=top_k, draft_stop=draft_stop)
    _check_prompt(model, input_ids, max_new_tokens)
    policy = Policy(temperature, top_p, top_k)
    eos = _as_set(eos_token_id) if eos_token_id is not None else set()
    t0 = time.perf_counter()
    cache, n, last = _prefill(model, input_ids, with_exit=True, room=max_new_tokens + gamma + 1)
    tokens, from_draft, per_cycle, per_cycle_drafted = [], [], [], []
    overlap_sum = 0.0
    done = False
    while not done and len(tokens) < max_new_tokens:
        g = min(gamma, max_new_tokens - len(tokens) - 1)  # the target always adds one token per cycle
        cycle = speculate_cycle(model, policy, cache, n, last, g, draft_stop, generator)
        k = cycle.accepted
        per_cycle.append(k)
        per_cycle_drafted.append(len(cycle.drafts))
        overlap_sum += cycle.overlap
        for i, t in enumerate(cycle.drafts[:k] + [cycle.token]):
            tokens.append(t)
            from_draft.append(i < k)
            if t in eos:
                done = True
                break
        n += k + 1
        cache.crop(n)  # rejected drafts' positions go
        last = torch.tensor([[cycle.token]], device=input_ids.device)
    stats = cycle_stats(per_cycle, per_cycle_drafted, overlap_sum, gamma)
    stats.update(from_draft=from_draft[: len(tokens)],
                 cache_positions=[cache.length(i) for i in range(model.num_layers)])
    return _finish(tokens, stats, t0, input_ids.device)


def cycle_stats(per_cycle, per_cycle_drafted, overlap_sum, gamma):
    """The loop's stats from its cycles' accepted and drafted counts (see speculative_generate)."""
    cycles, drafted = len(per_cycle), sum(per_cycle_drafted)
    accepted, rejected = judged_drafts(per_cycle, per_cycle_drafted)
    avg_overlap = overlap_sum / drafted if drafted else float("nan")
    hist, len_hist = [0] * (gamma + 1), [0] * (gamma + 1)
    for k, d in zip(per_cycle, per_cycle_drafted):
        hist[k] += 1
        len_hist[d] += 1
    return {
        "target_calls": cycles, "drafted": drafted, "accepted": accepted, "rejected": rejected,
        "avg_accepted": accepted / cycles if cycles else 0.0,
        "acceptance_rate": accepted / drafted if drafted else float("nan"),
        "avg_overlap": avg_overlap, "avg_tv": 1.0 - avg_overlap, "overlap_sum": overlap_sum,
        "accept_hist": hist, "draft_len_hist": len_hist, "avg_draft_len": drafted / cycles if cycles else 0.0,
        "per_cycle": per_cycle, "per_cycle_drafted": per_cycle_drafted,
    }


# ================================================================================================================
# The sweep. A cell is (exit, L, gamma, temperature, top_p, top_k) on one prompt set; see the module docstring.

RESULTS, SUMMARY_CSV, SUMMARY_MD = "results.jsonl", "summary.csv", "summary.md"
LAYER_SWEEP = "layer_sweep"
DATASETS = ("sharegpt", "xsum", "slimpajama")
# Fields that depend on the machine and the moment; everything else in a row is a pure function of the cell.
TIMING_FIELDS = ("seconds", "tokens_per_s", "baseline_seconds", "baseline_tokens_per_s", "speedup",
                 "draft_step_ms", "full_step_ms", "c", "v", "predicted_speedup",
                 "cpu", "cpu_flags", "threads", "torch", "gpu", "engine")  # the machine, and the forms it measured


@dataclass(frozen=True)
class Cell:
    exit: str            # "untrained", or the checkpoint directory as given to --exit_ckpt
    exit_layer: int
    gamma: int           # the draft length; with draft_stop, its cap
    temperature: float
    top_p: float
    top_k: int
    draft_stop: float = 0.0  # adaptive draft length: stop when the draft's top probability is below this (0: off)

    @property
    def policy(self):
        return dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)


def make_cells(exits, gammas, temperatures, top_ps, top_ks, draft_stops=(0.0,)):
    """Every cell, in a fixed order: exits (as given), then gamma, temperature, top_p, top_k, draft_stop. Greedy
    ignores top_p and top_k, so greedy cells are kept once, with top_p 1.0 and top_k 0."""
    cells = []
    for (name, layer), g, t, p, k, s in itertools.product(exits, gammas, temperatures, top_ps, top_ks, draft_stops):
        cell = Cell(name, layer, g, float(t), 1.0 if t == 0 else float(p), 0 if t == 0 else k, float(s))
        if cell not in cells:
            cells.append(cell)
    return cells


def cell_id(cell, context):
    """A stable id of a cell: a hash of its fields and everything its numbers depend on (model, exit weights, prompt
    set, max_new_tokens, seed, dtype). draft_stop 0 is left out, so cells of sweeps made before it existed keep
    their ids (and --resume finds them)."""
    fields = asdict(cell)
    if not fields["draft_stop"]:
        del fields["draft_stop"]
    key = json.dumps({**fields, **context, "exit_id": context["exit_ids"][cell.exit]}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def prompt_seed(seed, index):
    """The sampling seed of prompt `index`: the same for the speculative and the baseline run of every cell."""
    return int(hashlib.sha256(f"{seed}/{index}".encode()).hexdigest()[:15], 16)


def judged_drafts(per_cycle, per_cycle_drafted):
    """(accepted, rejected) drafts of one speculative_generate call from its per-cycle accepted and drafted counts
    (stats per_cycle, per_cycle_drafted): a cycle that drafted d tokens and accepted k < d rejected one; drafts
    after a rejection are never judged. (The drafted counts come from the loop: with draft_stop they are not a
    function of gamma.)"""
    if len(per_cycle) != len(per_cycle_drafted) or any(not 0 <= k <= d for k, d in zip(per_cycle, per_cycle_drafted)):
        raise ValueError("per_cycle and per_cycle_drafted must be equally long, with 0 <= accepted <= drafted.")
    return sum(per_cycle), sum(k < d for k, d in zip(per_cycle, per_cycle_drafted))


def tokens_per_cycle(a, d):
    """Expected tokens of a cycle that drafts d tokens, each accepted with probability a given the ones before it:
    the accepted drafts plus the target's own token, (1 - a^(d+1)) / (1 - a)."""
    return d + 1 if a >= 1 else (1 - a ** (d + 1)) / (1 - a)


def predicted_speedup(a, gamma, c, draft_len_hist=None, v=1.0):
    """The standard estimate (Leviathan et al., 2023): a cycle yields (1 - a^(g+1)) / (1 - a) tokens, on average,
    when each draft is accepted with probability a given the ones before it, and costs g c + v autoregressive steps
    (g draft steps of cost c, and one verification of cost v, 1 by default).

    With `draft_len_hist` (cycles that drafted 0, 1, .. tokens: the realised lengths, which --draft_stop and the
    last cycles of a generation make shorter than gamma), the tokens per cycle are averaged over those lengths and
    the cost is d c + v with d their mean."""
    if a is None or not math.isfinite(a):
        return None
    lengths = {gamma: 1} if draft_len_hist is None else {d: n for d, n in enumerate(draft_len_hist) if n}
    cycles = sum(lengths.values())
    if not cycles:
        return None
    tokens = sum(n * tokens_per_cycle(a, d) for d, n in lengths.items()) / cycles
    mean_d = sum(n * d for d, n in lengths.items()) / cycles
    return tokens / (mean_d * c + v)


BREAK_EVEN_GAMMAS = (1, 2, 4)


def break_even_c(a, gamma, v=1.0):
    """The draft cost c (draft step / full step) at which the predicted speedup of a cycle of gamma drafts, each
    accepted with probability a, is exactly 1: tokens_per_cycle(a, gamma) = gamma c + v. Below it, drafting pays."""
    return (tokens_per_cycle(a, gamma) - v) / gamma


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def step_times(model, input_ids, verify_sizes=(), repeats=7):
    """(seconds of one draft step, seconds of one autoregressive step, {k: seconds of a k-token full step}): medians
    of warm calls of `draft_step` and `full_step` on a cache holding `input_ids`, interleaved so that load affects
    them alike. A k-token full step costs what verifying k - 1 drafts does."""
    cache, n, last = _prefill(model, input_ids, with_exit=True)
    steps = {"draft": lambda: model.draft_step(last, cache, n), 1: lambda: model.full_step(last, cache, n)}
    for k in verify_sizes:
        steps[k] = (lambda k=k: model.full_step(input_ids[:, n - k + 1:n + 1], cache, n))  # positions n..n+k-1
    times = {kind: [] for kind in steps}
    for r in range(repeats + 1):
        for kind, step in steps.items():
            t = time.perf_counter()
            step()
            _sync(input_ids.device)
            if r:  # the first round warms up
                times[kind].append(time.perf_counter() - t)
            cache.crop(n)
    med = {kind: statistics.median(v) for kind, v in times.items()}
    return med["draft"], med[1], {k: med[k] for k in verify_sizes}


def run_baseline(model, prompts, policy, max_new_tokens, seed, eos, first=0):
    """The autoregressive reference for one policy: every prompt's tokens and the total time (`first`: the index
    of prompts[0] in the sweep's prompts, which picks its sampling seed)."""
    tokens, seconds = [], 0.0
    for i, p in enumerate(prompts, start=first):
        g = torch.Generator(p["input_ids"].device).manual_seed(prompt_seed(seed, i))
        out, s = autoregressive_generate(model, p["input_ids"], max_new_tokens, eos_token_id=eos, generator=g, **policy)
        tokens.append(out)
        seconds += s["seconds"]
    new = sum(len(t) for t in tokens)
    return {"tokens": tokens, "new_tokens": new, "seconds": seconds, "tokens_per_s": new / seconds if seconds else 0.0}


def first_difference(a, b):
    """The first position where token sequences a and b differ (a length difference counts); None if equal."""
    n = min(len(a), len(b))
    where = (a[:n] != b[:n]).nonzero()
    if len(where):
        return int(where[0])
    return None if len(a) == len(b) else n


def run_cell(model, cell, prompts, max_new_tokens, seed, eos, baseline, times):
    """Speculative decoding of every prompt for one cell; its row of results (stats summed over prompts).
    `baseline` None: the cell times its own baseline, each prompt's autoregressive run just before its speculative
    one (paired, so that a drift in the machine's speed falls on both alike)."""
    keys = ("new_tokens", "target_calls", "drafted", "accepted", "overlap_sum", "seconds")
    total = dict.fromkeys(keys, 0)
    rejected = 0
    hist, len_hist = [0] * (cell.gamma + 1), [0] * (cell.gamma + 1)
    same, first_diffs = 0, []
    paired = baseline is None
    if paired:
        baseline = {"tokens": [], "new_tokens": 0, "seconds": 0.0}
    for i, p in enumerate(prompts):
        if paired:
            one = run_baseline(model, [p], cell.policy, max_new_tokens, seed, eos, first=i)
            baseline["tokens"] += one["tokens"]
            baseline["new_tokens"] += one["new_tokens"]
            baseline["seconds"] += one["seconds"]
        g = torch.Generator(p["input_ids"].device).manual_seed(prompt_seed(seed, i))
        out, s = speculative_generate(model, p["input_ids"], max_new_tokens, gamma=cell.gamma, eos_token_id=eos,
                                      generator=g, draft_stop=cell.draft_stop, **cell.policy)
        for k in keys:
            total[k] += s[k]
        rejected += judged_drafts(s["per_cycle"], s["per_cycle_drafted"])[1]
        hist = [a + b for a, b in zip(hist, s["accept_hist"])]
        len_hist = [a + b for a, b in zip(len_hist, s["draft_len_hist"])]
        diff = first_difference(out, baseline["tokens"][i])
        same += diff is None
        first_diffs += [] if diff is None else [diff]
    if paired:
        baseline["tokens_per_s"] = baseline["new_tokens"] / baseline["seconds"] if baseline["seconds"] else 0.0
    drafted, calls = total["drafted"], total["target_calls"]
    overlap = total["overlap_sum"] / drafted if drafted else None
    rate = total["accepted"] / drafted if drafted else None
    judged = total["accepted"] + rejected
    alpha = total["accepted"] / judged if judged else None  # the formula's a: P(accept | the drafts before were)
    tps = total["new_tokens"] / total["seconds"] if total["seconds"] else 0.0
    draft_s, full_s, verify_s = times
    c = draft_s / full_s
    # v: a cycle's verification (d drafts: d + 1 tokens) over a one-token step, averaged over the realised lengths
    v = sum(n * verify_s.get(d + 1, full_s) for d, n in enumerate(len_hist)) / max(sum(len_hist), 1) / full_s
    return {
        **asdict(cell), "prompts": len(prompts),
        "new_tokens": total["new_tokens"], "target_calls": calls, "drafted": drafted, "accepted": total["accepted"],
        "avg_accepted": total["accepted"] / calls if calls else 0.0, "acceptance_rate": rate, "alpha": alpha,
        "avg_overlap": overlap, "avg_tv": 1.0 - overlap if overlap is not None else None, "accept_hist": hist,
        "avg_draft_len": drafted / calls if calls else 0.0, "draft_len_hist": len_hist,
        "matches_baseline": same == len(prompts) if cell.temperature == 0 else None,
        "greedy_match": f"{same}/{len(prompts)}" if cell.temperature == 0 else None,
        "first_diff_mean": statistics.fmean(first_diffs) if cell.temperature == 0 and first_diffs else None,
        "baseline_new_tokens": baseline["new_tokens"],
        "seconds": total["seconds"], "tokens_per_s": tps,
        "baseline_seconds": baseline["seconds"], "baseline_tokens_per_s": baseline["tokens_per_s"],
        "speedup": tps / baseline["tokens_per_s"] if baseline["tokens_per_s"] else None,
        "draft_step_ms": 1e3 * draft_s, "full_step_ms": 1e3 * full_s, "c": c, "v": v,
        "predicted_speedup": predicted_speedup(alpha, cell.gamma, c, len_hist, v), "paired_baseline": paired,
    }


# ----------------------------------------------------------------------------------------------------------------
# Results files: one JSON line per cell, appended in one write; merged (and sorted) by rank 0 at the end.


def read_rows(path):
    """The complete rows of a results file; a line cut off by a kill (or otherwise unreadable) is ignored."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "cell_id" in row:
                rows.append(row)
    return rows


def read_rows_plain(path):
    """The JSON objects of a JSONL file written atomically by this module (none if it is missing)."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def finished_cells(out_dir, ids):
    """The cells among `ids` with a row in out_dir's results files."""
    return {r["cell_id"] for path in results_files(out_dir) for r in read_rows(path)} & set(ids)


def results_files(out_dir):
    """results.jsonl and any per-process results.rank*.jsonl of an interrupted multi-process run."""
    out_dir = Path(out_dir)
    return [p for p in [out_dir / RESULTS, *sorted(out_dir.glob("results.rank*.jsonl"))] if p.is_file()]


def append_row(path, row):
    """Append one complete line with a single write, flushed to disk: a kill leaves whole lines, or a partial last
    line that `read_rows` skips and `repair_tail` removes before the next append."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(row) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_tail(path):
    """Cut a partial last line (left by a kill in the middle of a write) off a results file."""
    path = Path(path)
    if path.is_file() and path.stat().st_size:
        data = path.read_bytes()
        if not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)


def write_atomically(path, text):
    """Write a file through a temporary file and os.replace: readers see the old file or the new one, whole."""
    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def merge_results(out_dir, ids):
    """Merge results.jsonl and the per-process files into results.jsonl: each cell once, this sweep's cells first in
    cell order (rows of other sweeps kept after them). Returns this sweep's rows."""
    out_dir = Path(out_dir)
    files = results_files(out_dir)
    rows = {}
    for path in files:
        for row in read_rows(path):
            rows.setdefault(row["cell_id"], row)
    order = {cid: i for i, cid in enumerate(ids)}
    merged = sorted(rows.values(), key=lambda r: order.get(r["cell_id"], len(order)))
    write_atomically(out_dir / RESULTS, "".join(json.dumps(r) + "\n" for r in merged))
    for path in files:
        if path.name != RESULTS:
            path.unlink()
    return [r for r in merged if r["cell_id"] in order]


def write_table(path, rows, columns):
    """A CSV file of `columns` of `rows` (lists as space-separated values), written atomically."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(columns)
    for r in rows:
        w.writerow([" ".join(map(str, r[c])) if isinstance(r.get(c), list) else r.get(c, "") for c in columns])
    write_atomically(path, buf.getvalue())


def _fmt(x, digits=3):
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def exit_label(row):
    name = "untrained" if row["exit"] == "untrained" else Path(row["exit"]).name
    return f"{name} L{row['exit_layer']}"


def _gamma_label(row):
    """γ, and the adaptive stop when the cell has one: `4` or `4, stop 0.3`."""
    stop = row.get("draft_stop") or 0
    return f"{row['gamma']}" + (f", stop {stop:g}" if stop else "")


def _policy_name(policy):
    t, p, k = policy
    return "greedy" if t == 0 else f"T={t:g}, top_p={p:g}" + (f", top_k={k}" if k else "")


def _greedy_label(r):
    """'8/8' for a greedy cell (with the mean first-difference position when some prompts part); '-' otherwise."""
    if r.get("greedy_match") is None:
        return _fmt(r.get("matches_baseline"))
    diff = r.get("first_diff_mean")
    return r["greedy_match"] + (f" (at {diff:.0f})" if diff is not None else "")


def markdown_table(rows):
    """The summary as a Markdown table."""
    head = ["exit", "γ", "policy", "avg drafts", "accepted / drafted", "α", "avg accepted", "overlap", "tok/s",
            "baseline tok/s", "speedup", "c", "predicted", "greedy = baseline (first diff)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [exit_label(r), _gamma_label(r), _policy_name((r["temperature"], r["top_p"], r["top_k"])),
                 _fmt(r.get("avg_draft_len"), 2), f"{r['accepted']} / {r['drafted']}", _fmt(r["alpha"], 2),
                 _fmt(r["avg_accepted"], 2), _fmt(r["avg_overlap"]), _fmt(r["tokens_per_s"], 1),
                 _fmt(r["baseline_tokens_per_s"], 1), _fmt(r["speedup"], 2), _fmt(r["c"], 2),
                 _fmt(r["predicted_speedup"], 2), _greedy_label(r)]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


SUMMARY_COLUMNS = ("exit", "exit_layer", "gamma", "temperature", "top_p", "top_k", "draft_stop", "prompts",
                   "new_tokens", "target_calls", "drafted", "accepted", "avg_accepted", "acceptance_rate", "alpha",
                   "avg_overlap", "avg_tv", "accept_hist", "avg_draft_len", "draft_len_hist", "matches_baseline",
                   "greedy_match", "first_diff_mean", "seconds", "tokens_per_s", "baseline_new_tokens",
                   "baseline_seconds", "baseline_tokens_per_s", "speedup", "draft_step_ms", "full_step_ms", "c",
                   "v", "predicted_speedup", "cell_id")


# ----------------------------------------------------------------------------------------------------------------
# Prompts and held-out text


def prompt_messages(record):
    """The chat turns of a prompts.jsonl record, {"prompt": str} or {"messages": [{"role", "content"}, ...]}; None
    when it has no usable prompt (an empty string, turns that are not all {"role": str, "content": str}, ...)."""
    if isinstance(record.get("prompt"), str) and record["prompt"].strip():
        return [{"role": "user", "content": record["prompt"]}]
    messages = record.get("messages")
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)
    return messages if ok else None


def load_prompt_file(path, tokenizer, num_prompts, max_prompt_tokens, seq_len, skip_bad_lines=False):
    """A prompts.jsonl file: each line {"prompt": str} or {"messages": [{"role", "content"}, ...]}, used in file order.

    The prompt is the line up to its last non-assistant turn, under the chat template with the generation prompt.
    The held-out text for the teacher-forced sweep is every line in full: loss on the assistant's turns when it has
    some, else on every token. Lines longer than max_prompt_tokens are skipped as prompts. A malformed line, or one
    without a usable prompt, is an error naming it (skipped and counted with skip_bad_lines); so is a file with
    fewer than num_prompts prompts."""
    from data_utils import (BadEntries, chat_tokens_with_mask, encode, pack_sequences, prompt_dict, read_json_records,
                            render_chat)
    bad = BadEntries("--dataset", skip=skip_bad_lines)
    records, info = read_json_records(path, flag="--dataset", bad=bad)
    chat = bool(getattr(tokenizer, "chat_template", None))
    prompts, seqs = [], []
    for i, (r, line) in enumerate(zip(records, info["lines"])):
        messages = prompt_messages(r)
        if messages is None:
            bad.found(path, f"line {line}", 'has no usable prompt (a non-empty "prompt" string, or "messages": a list '
                                            'of {"role", "content"} strings)')
            continue
        asked = messages
        while len(asked) > 1 and asked[-1]["role"] == "assistant":
            asked = asked[:-1]
        join = lambda turns: "\n\n".join(m["content"] for m in turns)
        text = render_chat(tokenizer, asked, add_generation_prompt=True) if chat else join(asked)
        ids = encode(tokenizer, text)
        if len(prompts) < num_prompts and 0 < len(ids) <= max_prompt_tokens:
            prompts.append(prompt_dict(r.get("id", i), ids, text))
        if chat and any(m["role"] == "assistant" for m in messages):
            seqs.append(chat_tokens_with_mask(tokenizer, messages))
        else:
            full = encode(tokenizer, render_chat(tokenizer, messages) if chat else join(messages))
            seqs.append((full, [1] * len(full)))
    bad.report()
    check_prompt_count(prompts, num_prompts, max_prompt_tokens, path)
    return prompts, pack_sequences(seqs, seq_len)


def check_prompt_count(prompts, num_prompts, max_prompt_tokens, source, kind="prompt"):
    """A run uses the number of prompts asked for, or stops here saying why not."""
    if len(prompts) < num_prompts:
        which = f"{kind}{'' if len(prompts) == 1 else 's'} of at most {max_prompt_tokens} tokens"
        if kind == "document":  # SlimPajama: a prompt is the start of a longer document
            which = f"document{'' if len(prompts) == 1 else 's'} longer than {max_prompt_tokens} tokens"
        raise DataError(f"--num_prompts {num_prompts}: {source} has only {len(prompts)} {which} "
                        "(--max_prompt_tokens); ask for fewer prompts or change --max_prompt_tokens.")


def load_eval_data(args, tokenizer):
    """(prompts, held-out blocks for the teacher-forced sweep) from --dataset: the test split of ShareGPT, XSum or
    SlimPajama (the same 98/1/1 split by id as train.py's default), or a prompts.jsonl file."""
    n, mpt, seed, seq_len, blocks = args.num_prompts, args.max_prompt_tokens, args.seed, args.tf_seq_len, args.tf_blocks
    skip = args.skip_bad_lines
    if args.dataset not in DATASETS:
        return load_prompt_file(args.dataset, tokenizer, n, mpt, seq_len, skip)
    from data_utils import split_by_id
    if args.dataset == "sharegpt":
        import share_gpt_dataset as ds
        flag = "--data_files" if args.data_files else "--dataset_id"
        items = ds.load_splits(args.data_files or args.dataset_id, flag=flag, skip_bad_lines=skip)["test"]
        make = lambda convs: ds.training_sequences(tokenizer, convs, seq_len)
    elif args.dataset == "xsum":
        import xsum_dataset as ds
        if args.data_files:
            items = split_by_id(ds.load_records(data_files=args.data_files, skip_bad_lines=skip), "id")["test"]
        else:
            items = ds.load_records(dataset_id=args.dataset_id or "EdinburghNLP/xsum", split="test")
        make = lambda records: ds.training_sequences(tokenizer, records, seq_len)
    else:
        import slim_pj_dataset as ds
        if args.data_files:
            texts = ds.load_texts(data_files=args.data_files, skip_bad_lines=skip)
            items = split_by_id(texts, lambda text: text)["test"]
        else:
            items = ds.load_texts(dataset_id=args.dataset_id, split="test", max_docs=2000)
        make = lambda texts: ds.training_sequences(tokenizer, texts, seq_len)
    prompts = ds.evaluation_prompts(tokenizer, items, n, max_prompt_tokens=mpt, seed=seed)
    check_prompt_count(prompts, n, mpt, f"the {args.dataset} test split",
                       "document" if args.dataset == "slimpajama" else "prompt")
    return prompts, sample_blocks(items, make, blocks) if blocks else []


# ----------------------------------------------------------------------------------------------------------------
# The teacher-forced layer sweep: one pass per batch of held-out text gives every layer's untrained exit at once.


def _overlap_sum(p_logits, q_logits, temperature, chunk=1024):
    """sum over rows of sum_x min(p, q) at `temperature` (the expected acceptance of one drafted token)."""
    total = 0.0
    for i in range(0, p_logits.shape[0], chunk):
        p = torch.softmax(p_logits[i:i + chunk].float() / temperature, -1)
        q = torch.softmax(q_logits[i:i + chunk].float() / temperature, -1)
        total += torch.minimum(p, q).sum().item()
    return total


@torch.no_grad()
def layer_sweep(base, checkpoints, blocks, temperatures, batch_size, pad_id):
    """Teacher-forced metrics of the untrained exit at every layer 1..N-1 and of each checkpoint (name, exit) at its
    layer, on the loss-masked positions of `blocks`. The metrics are train.py's validation metrics (KL, top-1
    agreement, overlap at T=1 and 0.7, perplexities) plus the overlap at any other temperature asked for; TV is
    1 - overlap. Returns one row per (exit, layer)."""
    from data_utils import collate
    from truncated_llama import TruncatedLlama
    n = base.config.num_hidden_layers
    extra = sorted({float(t) for t in temperatures if t > 0 and float(t) not in (0.7, 1.0)})
    exits = [("untrained", layer, None) for layer in range(1, n)] + [(name, e.exit_layer, e) for name, e in checkpoints]
    sums = [None] * len(exits)
    probe = TruncatedLlama(base, 1)
    device = base.device

    def add(i, teacher, logits, labels):
        s = exit_metric_sums(teacher, logits, None, labels)
        for t in extra:
            s[f"overlap_t{t:g}"] = _overlap_sum(teacher, logits, t)
        sums[i] = s if sums[i] is None else {k: sums[i][k] + v for k, v in s.items()}

    for b in range(0, len(blocks), batch_size):
        batch = {k: v.to(device) for k, v in collate(blocks[b:b + batch_size], pad_id).items()}
        ids, attn = batch["input_ids"], batch["attention_mask"]
        attn = None if bool(attn.all()) else attn
        rows = target_rows(batch)
        if not rows.any():
            continue
        labels = ids[:, 1:][rows]
        out = probe(ids, attn, all_hidden_states=True)
        teacher = out.logits[:, :-1][rows]
        for i, (name, layer, exit) in enumerate(exits):
            if exit is None:
                logits = base.lm_head(base.model.norm(out.hidden_states[layer][:, :-1][rows]))
            else:
                logits = TruncatedLlama(base, layer, exit)(ids, attn).exit_logits[:, :-1][rows]
            add(i, teacher, logits, labels)
    result = []
    for (name, layer, _), s in zip(exits, sums):
        if s is None:
            continue
        row = {"exit": name, "exit_layer": layer, **summarize_metrics(s)}
        for t in extra:
            row[f"overlap_t{t:g}"] = s[f"overlap_t{t:g}"] / max(s["tokens"], 1.0)
        for key in [k for k in row if k.startswith("overlap_t")]:
            row["tv_" + key[len("overlap_"):]] = 1.0 - row[key]
        result.append(row)
    return result


# ----------------------------------------------------------------------------------------------------------------
# The command line


def build_parser():
    p = Parser(prog="evaluate.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
               description="The self-speculation sweep: every cell (exit, L, gamma, policy) against an autoregressive "
                           "baseline, a teacher-forced sweep of every layer, and the plots. List flags take several "
                           "space-separated values.")
    g = p.add_argument_group("grid")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="the alias smollm2-135m, a local directory or a Hugging Face id")
    g.add_argument("--exit_layers", nargs="*", default=None, metavar="L",
                   help="untrained exits at these layers: values and/or inclusive ranges start:stop[:step] such as "
                        "4:28:4 (default: every 4th layer, 4..N-1; give the flag with no value for none)")
    g.add_argument("--exit_ckpt", nargs="+", default=[], metavar="DIR",
                   help="trained exit directories written by train.py (each at its own layer)")
    g.add_argument("--gammas", nargs="+", type=int, default=[2, 4, 8, 16], help="draft lengths")
    g.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 0.7, 1.0], help="0 means greedy")
    g.add_argument("--top_p", nargs="+", type=float, default=[0.95], help="nucleus mass in (0, 1] (greedy ignores it)")
    g.add_argument("--top_k", nargs="+", type=int, default=[0], help="top-k, 0 = off (greedy ignores it)")
    g.add_argument("--draft_stop", nargs="+", type=float, default=[0.0], metavar="P",
                   help="adaptive draft length, each in [0, 1): a cycle stops drafting when the draft's top "
                        "probability (its policy's q; greedy: the temperature-1 softmax) is below P, gamma being the "
                        "cap (0: always gamma drafts)")
    g = p.add_argument_group("prompts and held-out text")
    g.add_argument("--dataset", default="sharegpt",
                   help="sharegpt | xsum | slimpajama (their test split) | a prompts.jsonl file whose lines are "
                        "{\"prompt\": ...} or {\"messages\": [...]}")
    g.add_argument("--data_files", default=None,
                   help="local JSON/JSONL/Parquet files of --dataset instead of the default")
    g.add_argument("--dataset_id", default=None, help="a Hugging Face dataset id of --dataset instead of the default")
    g.add_argument("--skip_bad_lines", action="store_true",
                   help="skip (and count) malformed lines and records without a usable prompt in the files given by "
                        "--dataset / --data_files, instead of stopping at the first one")
    g.add_argument("--num_prompts", type=int_at_least(1), default=16,
                   help="prompts per cell (fewer prompts within --max_prompt_tokens is an error)")
    g.add_argument("--max_prompt_tokens", type=int_at_least(1), default=256, help="longer prompts are skipped")
    g.add_argument("--max_new_tokens", type=int_at_least(1), default=128, help="tokens generated per prompt")
    g.add_argument("--seed", type=int, default=0, help="prompt choice and sampling (one generator per prompt)")
    g.add_argument("--tf_blocks", type=int_at_least(0), default=16,
                   help="held-out blocks for the teacher-forced layer sweep, drawn at random (seed 0) from across the "
                        "test split (0: skip it)")
    g.add_argument("--tf_seq_len", type=int_at_least(2), default=256, help="tokens per teacher-forced block")
    g.add_argument("--tf_batch_size", type=int_at_least(1), default=4, help="teacher-forced blocks per forward pass")
    g = p.add_argument_group("output and runtime")
    g.add_argument("--out_dir", default="out/eval", help="where results, tables and plots go")
    g.add_argument("--resume", action="store_true",
                   help="continue the sweep in --out_dir, skipping every finished cell (needed when it holds results)")
    g.add_argument("--paired_baseline", action="store_true",
                   help="every cell times its own autoregressive baseline, prompt by prompt in turns with its "
                        "speculative runs (twice the time; immune to drifts in the machine's speed between cells)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU when there is one (one per process), else CPU")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="weights and activations; auto: bfloat16 on a GPU or CPU with native bf16, else float32")
    g.add_argument("--engine", choices=ENGINES, default="auto",
                   help="generation steps: lean (decode_engine.py), hf (transformers' layers), auto: lean if it can")
    g.add_argument("--stop_after", type=int_at_least(0), default=0,
                   help="stop after this many cells, unmerged, as if killed (for testing --resume; 0: off)")
    g.add_argument("--best_line", default=None, metavar="DIR",
                   help="run nothing: print the best lossless speedup among the cells in DIR/results.jsonl (the "
                        "line every sweep ends with) and exit")
    return p


def parse_layers(values, num_layers=None):
    """--exit_layers values (ints and inclusive start:stop[:step] ranges) -> sorted distinct layers in 1..N-1.
    Without num_layers, only the syntax is checked."""
    if values is None and num_layers is None:
        return None
    if values is None:
        return list(range(4, num_layers, 4)) or list(range(1, num_layers))
    layers = []
    for v in values:
        try:
            parts = [int(x) for x in v.split(":")]
        except ValueError:
            parts = []
        if not 1 <= len(parts) <= 3 or (len(parts) == 3 and parts[2] < 1):
            raise UsageError(f"--exit_layers: expected integers or start:stop[:step] ranges, got {v!r}.")
        layers += parts if len(parts) == 1 else list(range(parts[0], parts[1] + 1, parts[2] if len(parts) == 3 else 1))
    for layer in layers if num_layers is not None else []:
        if not 1 <= layer <= num_layers - 1:
            raise UsageError(f"--exit_layers: layer {layer} is outside 1..{num_layers - 1} for this "
                             f"{num_layers}-layer model.")
    return sorted(set(layers))


def check_args(args):
    """Every check that needs no model: raise UsageError naming the flag."""
    try:
        for g in args.gammas:
            check_policy(gamma=g)
        for t, p, k in itertools.product(args.temperatures, args.top_p, args.top_k):
            check_policy(temperature=t, top_p=p, top_k=k)
        for s in args.draft_stop:
            check_policy(draft_stop=s)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.dataset not in DATASETS and not Path(args.dataset).is_file():
        raise UsageError(f"--dataset: {args.dataset!r} is neither {', '.join(DATASETS)} nor an existing prompts "
                         ".jsonl file.")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available.")
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out_dir: {out} exists and is not a directory.")
    if results_files(out) and not args.resume:
        raise UsageError(f"--out_dir: {out} already holds the results of a sweep; pass --resume to continue it, "
                         "or choose another --out_dir.")
    parse_layers(args.exit_layers)  # the syntax; the range is checked once the model is loaded


def _file_hash(*paths):
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def _tensor_hash(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Sweep:
    """Everything a sweep runs on, loaded and checked before anything is written."""
    base: object
    tok: object
    checkpoints: list      # (path, EarlyExit) of each --exit_ckpt
    exit_ids: dict         # exit name -> a hash of its files ("untrained" for the plain exits)
    prompts: list
    blocks: list           # held-out blocks for the teacher-forced sweep
    exits: list            # (exit name, layer)
    cells: list
    ids: list              # each cell's id
    fingerprint: str
    dtype_name: str
    machine: dict


def load_sweep(args, device):
    """The model, the exits, the prompts and the cells; raises UsageError & co for anything that does not fit."""
    from truncated_llama import load_base_model, machine_info, model_fingerprint, resolve_dtype
    from tuned_llama import CONFIG_FILE, WEIGHTS_FILE, load_exit

    dtype, dtype_name = resolve_dtype(args.dtype, device)
    base, tok = load_base_model(args.model, dtype=dtype, device=device)
    layers = parse_layers(args.exit_layers, base.config.num_hidden_layers)
    if args.tf_blocks:
        check_context(base.config, "--tf_seq_len", args.tf_seq_len)
    fingerprint = model_fingerprint(base)
    checkpoints, exit_ids = [], {"untrained": "untrained"}
    for path in dict.fromkeys(args.exit_ckpt):
        exit, _ = load_exit(path, base, base_fingerprint=fingerprint)
        checkpoints.append((path, exit.requires_grad_(False).eval()))
        exit_ids[path] = _file_hash(Path(path) / CONFIG_FILE, Path(path) / WEIGHTS_FILE)
    if not layers and not checkpoints:
        raise UsageError("--exit_layers/--exit_ckpt: there is no exit to evaluate; give layers or checkpoints.")
    prompts, blocks = load_eval_data(args, tok)
    check_context(base.config, "--max_new_tokens", args.max_new_tokens, prompt_name="the longest prompt",
                  prompt=max(p["input_ids"].shape[1] for p in prompts))
    prompts = [{**p, "input_ids": p["input_ids"].to(device)} for p in prompts]
    exits = [("untrained", L) for L in layers] + [(path, e.exit_layer) for path, e in checkpoints]
    cells = make_cells(exits, args.gammas, args.temperatures, args.top_p, args.top_k, args.draft_stop)
    context = {"model": args.model, "model_fingerprint": fingerprint, "dtype": dtype_name, "exit_ids": exit_ids,
               "prompts": _tensor_hash([p["input_ids"] for p in prompts]), "max_new_tokens": args.max_new_tokens,
               "seed": args.seed, **({"paired_baseline": True} if args.paired_baseline else {})}
    return Sweep(base, tok, checkpoints, exit_ids, prompts, blocks, exits, cells,
                 [cell_id(c, context) for c in cells], fingerprint, dtype_name, machine_info(device))


def teacher_forced(args, sw, out_dir, say):
    """The teacher-forced layer sweep's rows: kept from layer_sweep.jsonl when it holds this sweep's, else run."""
    eos = sw.tok.eos_token_id
    tf_id = hashlib.sha256(json.dumps([sw.fingerprint, sw.dtype_name, [sw.exit_ids[p] for p, _ in sw.checkpoints],
                                       _tensor_hash([b["input_ids"] for b in sw.blocks]),
                                       sorted(args.temperatures)]).encode()).hexdigest()[:16]
    tf_rows = read_rows_plain(out_dir / f"{LAYER_SWEEP}.jsonl")
    if len(tf_rows) == sw.base.config.num_hidden_layers - 1 + len(sw.checkpoints) and \
            all(r.get("sweep_id") == tf_id for r in tf_rows):
        say(f"teacher-forced sweep: kept the {len(tf_rows)} rows already in {LAYER_SWEEP}.jsonl")
        return tf_rows
    t = time.perf_counter()
    pad = sw.tok.pad_token_id if sw.tok.pad_token_id is not None else (eos if isinstance(eos, int) else 0)
    tf_rows = [{**r, "sweep_id": tf_id} for r in layer_sweep(sw.base, sw.checkpoints, sw.blocks, args.temperatures,
                                                              args.tf_batch_size, pad)]
    write_atomically(out_dir / f"{LAYER_SWEEP}.jsonl", "".join(json.dumps(r) + "\n" for r in tf_rows))
    write_table(out_dir / f"{LAYER_SWEEP}.csv", tf_rows, list(tf_rows[0]))
    say(f"teacher-forced sweep: {len(tf_rows)} rows (exit x layer) on {tf_rows[0]['tokens']} tokens "
        f"in {time.perf_counter() - t:.0f} s")
    return tf_rows


def run_grid(args, sw, mine, own, meta, main, say):
    """Run this process's cells (indices `mine`), appending each finished row to `own`. False when --stop_after
    stopped it early."""
    from tqdm import tqdm
    from truncated_llama import TruncatedLlama

    trained, eos, prompts = dict(sw.checkpoints), sw.tok.eos_token_id, sw.prompts
    if mine:
        warm = TruncatedLlama(sw.base, sw.exits[0][1], trained.get(sw.exits[0][0]), engine=args.engine)
        few = min(8, args.max_new_tokens)
        speculative_generate(warm, prompts[0]["input_ids"], few, gamma=2)  # first calls allocate; keep them untimed
        autoregressive_generate(warm, prompts[0]["input_ids"], few)
    long_prompt = max((p["input_ids"] for p in prompts), key=lambda x: x.shape[1])
    timing_ids = torch.cat([long_prompt, long_prompt[:, -1:].expand(1, args.max_new_tokens // 2)], dim=1)
    baselines, times, model, model_key = {}, {}, None, None
    bar = tqdm(total=len(mine), disable=not main, desc="cells", dynamic_ncols=True)
    for count, i in enumerate(mine):
        cell = sw.cells[i]
        key = (cell.exit, cell.exit_layer)
        if key != model_key:  # cells come grouped by exit; the baselines are re-timed for each exit (see below)
            model, model_key, baselines = TruncatedLlama(sw.base, cell.exit_layer, trained.get(cell.exit),
                                                         engine=args.engine), key, {}
        if key not in times:
            times[key] = step_times(model, timing_ids, range(2, max(args.gammas) + 2))
        pkey = tuple(cell.policy.values())
        if pkey not in baselines and not args.paired_baseline:  # once per exit and policy, just before its cells
            baselines[pkey] = run_baseline(model, prompts, cell.policy, args.max_new_tokens, args.seed, eos)
        row = run_cell(model, cell, prompts, args.max_new_tokens, args.seed, eos, baselines.get(pkey), times[key])
        append_row(own, {"cell_id": sw.ids[i], "index": i, **meta, "engine": model.describe_engine(), **row})
        bar.update()
        bar.set_postfix(exit=f"L{cell.exit_layer}", gamma=cell.gamma, T=cell.temperature,
                        speedup=f"{row['speedup']:.2f}")
        if args.stop_after and count + 1 >= args.stop_after:
            bar.close()
            say(f"stopped after {count + 1} cells (--stop_after); rerun with --resume to finish")
            return False
    bar.close()
    return True


def write_summary(args, sw, out_dir, tf_rows, say):
    """Merge the results files; write the tables and plots; print the table and the best line. Returns the rows."""
    rows = merge_results(out_dir, sw.ids)
    write_table(out_dir / SUMMARY_CSV, rows, SUMMARY_COLUMNS)
    table = markdown_table(rows)
    command = " ".join(["python evaluate.py", *getattr(args, "argv", [])])
    write_atomically(out_dir / SUMMARY_MD, f"# Self-speculation sweep\n\n`{command}`\n\n{table}")
    if tf_rows is None:
        tf_rows = read_rows_plain(out_dir / f"{LAYER_SWEEP}.jsonl")
    from plots import make_plots
    plots = make_plots(rows, tf_rows, out_dir, Path(args.model).name)
    print(table)
    say(f"{len(rows)} cells in {out_dir / RESULTS}; {SUMMARY_CSV}, {SUMMARY_MD}"
        f"{', ' + LAYER_SWEEP + '.jsonl/.csv' if tf_rows else ''} and {len(plots)} plots in {out_dir}")
    print(best_line(rows), flush=True)
    return rows


def run(args, stop=None):
    """The sweep as the flags say (see the module docstring). Returns this sweep's rows on the main process.
    `stop` (a data_utils.SignalStop) is told what a SIGINT or SIGTERM would keep."""
    from accelerate import PartialState
    from truncated_llama import dtype_line

    t_start = time.perf_counter()
    stop = stop if stop is not None else SignalStop()
    check_args(args)
    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=cpu)
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    device = torch.device("cpu") if cpu else state.device
    say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if main else (lambda *a: None)

    sw = load_sweep(args, device)  # everything is loaded and checked before anything is written
    out_dir = Path(args.out_dir)
    done = finished_cells(out_dir, sw.ids)
    todo = [i for i, cid in enumerate(sw.ids) if cid not in done]
    mine = todo[rank::world]
    stop.kept = lambda: (f"kept {len(finished_cells(out_dir, sw.ids))} of {len(sw.ids)} cells in {out_dir} "
                         "(the cell in progress is dropped)")  # what a SIGINT or SIGTERM keeps, on disk
    stop.resumable = True
    state.wait_for_everyone()  # every process has read the same finished cells before any process writes
    stops, gammas = len(set(args.draft_stop)), len(set(args.gammas))
    say(dtype_line(args.dtype, sw.dtype_name, sw.machine))  # after every check: an error stays the only line
    say(f"{len(sw.cells)} cells ({len(sw.exits)} exits x {gammas} gammas x "
        f"{len(sw.cells) // (len(sw.exits) * gammas * stops)} policies"
        f"{f' x {stops} draft stops' if stops > 1 else ''}) on {len(sw.prompts)} prompts "
        f"x {args.max_new_tokens} new tokens; {len(sw.cells) - len(todo)} already done, {len(todo)} to run on "
        f"{world} process(es)")

    out_dir.mkdir(parents=True, exist_ok=True)
    own = out_dir / (RESULTS if world == 1 else f"results.rank{rank}.jsonl")
    repair_tail(own)
    meta = {"model": args.model, "dataset": args.dataset, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
            "dtype": sw.dtype_name, "device": device.type, **sw.machine}
    tf_rows = teacher_forced(args, sw, out_dir, say) if main and sw.blocks else None  # cheap next to the grid
    if not run_grid(args, sw, mine, own, meta, main, say):
        return None
    state.wait_for_everyone()
    rows = write_summary(args, sw, out_dir, tf_rows, say) if main else None
    say(f"sweep done in {time.perf_counter() - t_start:.0f} s")
    state.wait_for_everyone()
    state.destroy_process_group()
    return rows


def best_line(rows):
    """One line naming the cell with the best measured speedup that is lossless: every sampling cell (exact by
    construction; the chi-square tests check it), and a greedy cell only if its tokens equal the autoregressive
    baseline's on every prompt (matches_baseline).

        best lossless speedup: X.XXx (<exit>, L <l>, gamma <g>, <policy>, <n> prompts x <m> tokens)
    """
    ok = [r for r in rows if r.get("speedup") is not None
          and (r["temperature"] > 0 or r.get("matches_baseline") is True)]
    if not ok:
        return "best lossless speedup: none (no sampling cell, and no greedy cell whose tokens match the baseline)"
    r = max(ok, key=lambda r: r["speedup"])
    name = "untrained" if r["exit"] == "untrained" else Path(r["exit"]).name
    policy = _policy_name((r["temperature"], r["top_p"], r["top_k"]))
    if r.get("draft_stop"):
        policy += f", draft_stop {r['draft_stop']:g}"
    return (f"best lossless speedup: {r['speedup']:.2f}x ({name}, L {r['exit_layer']}, gamma {r['gamma']}, {policy}, "
            f"{r['prompts']} prompts x {r['max_new_tokens']} tokens)")


def print_best_line(out_dir):
    """--best_line DIR: the best line of the cells in DIR's results files (merged, each cell once)."""
    files = results_files(out_dir)
    if not files:
        raise UsageError(f"--best_line: {out_dir} holds no {RESULTS} of a sweep.")
    rows = list({r["cell_id"]: r for path in reversed(files) for r in read_rows(path)}.values())
    line = best_line(rows)
    print(line, flush=True)
    return line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    body = (lambda stop: print_best_line(args.best_line)) if args.best_line is not None else partial(run, args)
    return run_command("evaluate.py", argv, body, errors=(ModelLoadError, CheckpointError))


if __name__ == "__main__":
    main()
