"""Self-speculative decoding: the KV-cached draft / verify loop on one shared model (batch size 1, as in gpt-fast).

    cache holds positions [0, n) in every layer; `last` is the newest committed token, not yet in the cache
    draft:   feed last, d1, .., d(g-1) through the shared layers + exit, one token at a time -> q1..qg, d1..dg
             feed dg through the shared layers too (its layer-L state is all verification still needs)
             (with draft_stop P: stop at the first q_j whose top probability is below P; g = j - 1 drafts)
    verify:  the remaining layers on the g+1 saved layer-L states at positions n..n+g   -> p1..p(g+1)
    accept:  k drafts by the speculative-sampling rule, then one token from the target (correction or bonus)
    commit:  crop every layer back to n+k+1 positions; last = the target's token

No layer ever recomputes a position, and after each cycle the cache holds exactly the committed tokens.

Reading order: `speculative_generate` (the loop) -> `speculate_cycle` (one cycle) -> `draft` and `Policy` (the
sampling policy and the acceptance rule). The model is anything with the `Steps` methods (truncated_llama's
TruncatedLlama); this module needs neither the sweep (evaluate.py) nor the trainer (train.py).
"""
import math
import statistics
import time
from typing import NamedTuple, Optional, Protocol

import torch

from cli import check_context, device_sync


class Cache(Protocol):
    """Keys and values of every layer at positions [0, length)."""

    def length(self, layer: int = 0) -> int: ...

    def crop(self, n: int) -> None: ...


class Steps(Protocol):
    """What the loop needs of a model: pieces of one forward pass, each on k new tokens at positions start.. ."""
    config: object
    num_layers: int

    def new_cache(self, capacity: int = 256) -> Cache: ...

    def extend(self, input_ids: torch.Tensor, cache: Cache, start: int, *, with_exit: bool = True) -> tuple: ...

    def draft_step(self, input_ids: torch.Tensor, cache: Cache, start: int) -> tuple: ...

    def verify(self, shared_hidden: torch.Tensor, cache: Cache, start: int) -> torch.Tensor: ...

    def full_step(self, input_ids: torch.Tensor, cache: Cache, start: int, *, with_exit: bool = False
                  ) -> torch.Tensor: ...


# ----------------------------------------------------------------------------------------------------------------
# The sampling policy and the acceptance rule

SWEEP_FLAGS = {"gamma": "--gammas", "temperature": "--temperatures", "top_p": "--top_p", "top_k": "--top_k",
               "draft_stop": "--draft_stop"}


def check_policy(*, gamma: int = 1, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 draft_stop: float = 0.0, flags: dict = SWEEP_FLAGS) -> None:
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

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, *, checked: bool = False):
        if not checked:  # checked: the caller already ran check_policy on these values
            check_policy(temperature=temperature, top_p=top_p, top_k=top_k)
        self.greedy = temperature == 0
        self.temperature = float(temperature)
        self.top_k = top_k if not self.greedy else 0
        self.top_p = float(top_p) if not self.greedy else 1.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
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

    def pick(self, logits: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One token id per row: argmax when greedy, else a sample from `probs`."""
        if self.greedy:
            return logits.argmax(-1)
        return sample(self.probs(logits), generator)

    def draft_token(self, logits: torch.Tensor, q: torch.Tensor, generator: Optional[torch.Generator] = None) -> int:
        """The draft's token from its (1, V) logits and their probabilities q: argmax, or a sample from q."""
        return int(logits.argmax(-1) if self.greedy else sample(q, generator))

    def accepted(self, p_logits: torch.Tensor, p: torch.Tensor, q: Optional[torch.Tensor], drafts: list,
                 generator: Optional[torch.Generator] = None) -> int:
        """How many drafts the target accepts, in order: while each equals argmax p (greedy), or by the
        speculative-sampling rule (one uniform draw per judged draft, stopping at the first rejection)."""
        target = p_logits[: len(drafts)].argmax(-1).tolist() if self.greedy else None
        for j, x in enumerate(drafts):
            ok = x == target[j] if self.greedy else accept_draft(p[j, x], q[j, x], generator)
            if not ok:
                return j
        return len(drafts)

    def target_token(self, p_logits: torch.Tensor, p: torch.Tensor, q: Optional[torch.Tensor], k: int,
                     generator: Optional[torch.Generator] = None) -> int:
        """The target's own token after k accepted drafts: argmax p (greedy); else the correction from
        normalise(max(0, p - q)) at a rejection, or the bonus token from p when every draft was accepted."""
        if self.greedy:
            return int(p_logits[k].argmax())
        rejected = q is not None and k < q.shape[0]
        return int(sample(residual_distribution(p[k], q[k]) if rejected else p[k], generator))


def sample(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
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


def accept_draft(p_x: torch.Tensor, q_x: torch.Tensor, generator: Optional[torch.Generator] = None) -> bool:
    """Accept a draft token x (sampled from q) with probability min(1, p(x) / q(x))."""
    u = torch.rand((), generator=generator, device=q_x.device)
    return bool(u * q_x < p_x)


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Where to sample after a rejection: normalise(max(0, p - q)); p itself if q covers p everywhere."""
    r = torch.clamp(p - q, min=0)
    total = r.sum()
    return r / total if total > 0 else p


# ----------------------------------------------------------------------------------------------------------------
# The loops


@torch.inference_mode()
def speculative_generate(model: Steps, input_ids: torch.Tensor, max_new_tokens: int, *, gamma: int,
                         temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, eos_token_id=None,
                         generator: Optional[torch.Generator] = None, draft_stop: float = 0.0) -> tuple:
    """Self-speculative decoding with `model` (a Steps: truncated_llama's TruncatedLlama). Returns (new tokens, stats).

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
    policy = Policy(temperature, top_p, top_k, checked=True)
    eos = _as_set(eos_token_id) if eos_token_id is not None else set()
    t0 = time.perf_counter()
    cache, n, last = _prefill(model, input_ids, with_exit=True, room=max_new_tokens + gamma + 1)
    tokens, from_draft, per_cycle, per_cycle_drafted = [], [], [], []
    # summed on the device in float64 (the same sums as Python floats), read once at the end: no sync per cycle
    overlap_sum = torch.zeros((), dtype=torch.float64, device=input_ids.device)
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
    stats = cycle_stats(per_cycle, per_cycle_drafted, overlap_sum.item(), gamma)
    stats.update(from_draft=from_draft[: len(tokens)],
                 cache_positions=[cache.length(i) for i in range(model.num_layers)])
    return _finish(tokens, stats, t0, input_ids.device)


class Cycle(NamedTuple):
    """One draft-verify cycle: the drafted tokens, how many the target accepted, the target's own token, and the
    sum over drafted positions of sum_x min(p, q) (their expected acceptance; a 0-d tensor, or 0.0 with no draft)."""
    drafts: list
    accepted: int
    token: int
    overlap: object


def speculate_cycle(model: Steps, policy: "Policy", cache: Cache, n: int, last: torch.Tensor, g: int,
                    draft_stop: float = 0.0, generator: Optional[torch.Generator] = None) -> Cycle:
    """Draft up to g tokens, verify them with the remaining layers in one pass, accept some: one Cycle. The cache
    then holds positions up to n + drafts; the caller crops it to what it commits."""
    hidden, q_rows, drafts = draft(model, policy, cache, n, last, g, draft_stop, generator)
    p_logits = model.verify(torch.cat(hidden, dim=1), cache, n)[0]
    p = policy.probs(p_logits)
    q = torch.cat(q_rows) if q_rows else None
    overlap = torch.minimum(p[: len(drafts)], q).sum() if drafts else 0.0
    k = policy.accepted(p_logits, p, q, drafts, generator)
    return Cycle(drafts, k, policy.target_token(p_logits, p, q, k, generator), overlap)


def draft(model: Steps, policy: "Policy", cache: Cache, n: int, last: torch.Tensor, g: int, draft_stop: float = 0.0,
          generator: Optional[torch.Generator] = None) -> tuple:
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


@torch.inference_mode()
def autoregressive_generate(model: Steps, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                            top_p: float = 1.0, top_k: int = 0, eos_token_id=None,
                            generator: Optional[torch.Generator] = None) -> tuple:
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
    device_sync(device)
    stats["seconds"] = time.perf_counter() - t0
    stats["new_tokens"] = len(tokens)
    stats["tokens_per_s"] = len(tokens) / stats["seconds"] if stats["seconds"] > 0 else 0.0
    return torch.tensor(tokens, dtype=torch.long), stats


def _as_set(eos):
    return set(eos) if isinstance(eos, (list, tuple, set)) else {eos}


# ----------------------------------------------------------------------------------------------------------------
# The stats, and the step timer


def cycle_stats(per_cycle: list, per_cycle_drafted: list, overlap_sum: float, gamma: int) -> dict:
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


def judged_drafts(per_cycle: list, per_cycle_drafted: list) -> tuple:
    """(accepted, rejected) drafts of one speculative_generate call from its per-cycle accepted and drafted counts
    (stats per_cycle, per_cycle_drafted): a cycle that drafted d tokens and accepted k < d rejected one; drafts
    after a rejection are never judged. (The drafted counts come from the loop: with draft_stop they are not a
    function of gamma.)"""
    if len(per_cycle) != len(per_cycle_drafted) or any(not 0 <= k <= d for k, d in zip(per_cycle, per_cycle_drafted)):
        raise ValueError("per_cycle and per_cycle_drafted must be equally long, with 0 <= accepted <= drafted.")
    return sum(per_cycle), sum(k < d for k, d in zip(per_cycle, per_cycle_drafted))


@torch.inference_mode()
def step_times(model: Steps, input_ids: torch.Tensor, verify_sizes=(), repeats: int = 7) -> tuple:
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
            device_sync(input_ids.device)
            if r:  # the first round warms up
                times[kind].append(time.perf_counter() - t)
            cache.crop(n)
    med = {kind: statistics.median(v) for kind, v in times.items()}
    return med["draft"], med[1], {k: med[k] for k in verify_sizes}
