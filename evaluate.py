"""Self-speculative decoding: a KV-cached draft/verify loop on one shared model, and the sweep that measures it.

The loop (batch size 1, like gpt-fast's):

    cache holds positions [0, n) in every layer; `last` is the newest committed token, not yet in the cache
    draft:   feed last, d1, .., d(g-1) through the shared layers + exit, one token at a time -> q1..qg, d1..dg
             feed dg through the shared layers too (its layer-L state is all verification still needs)
    verify:  the remaining layers on the g+1 saved layer-L states at positions n..n+g   -> p1..p(g+1)
    accept:  k drafts by the speculative-sampling rule, then one token from the target (correction or bonus)
    commit:  crop every layer back to n+k+1 positions; last = the target's token

No layer ever recomputes a position, and after each cycle the cache holds exactly the committed tokens.
"""
import math
import time

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

# ----------------------------------------------------------------------------------------------------------------
# The sampling policy


SWEEP_FLAGS = {"gamma": "--gammas", "temperature": "--temperatures", "top_p": "--top_p", "top_k": "--top_k"}


def check_policy(*, gamma=1, temperature=0.0, top_p=1.0, top_k=0, flags=SWEEP_FLAGS):
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


class Policy:
    """How logits become a next-token distribution: temperature, then top-k, then top-p (transformers' order and
    transformers' own warpers). Temperature 0 means greedy; its `probs` are the plain temperature-1 softmax."""

    def __init__(self, temperature=0.0, top_p=1.0, top_k=0):
        check_policy(temperature=temperature, top_p=top_p, top_k=top_k)
        self.greedy = temperature == 0
        self.warpers = []
        if not self.greedy:
            if temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(float(temperature)))
            if top_k > 0:
                self.warpers.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(float(top_p)))

    def probs(self, logits):
        """(k, V) logits -> (k, V) float32 probabilities under this policy."""
        scores = logits.float()
        for w in self.warpers:
            scores = w(None, scores)
        return torch.softmax(scores, dim=-1)

    def pick(self, logits, generator=None):
        """One token id per row: argmax when greedy, else a sample from `probs`."""
        if self.greedy:
            return logits.argmax(-1)
        return torch.multinomial(self.probs(logits), 1, generator=generator).squeeze(-1)


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


def _check_prompt(input_ids, max_new_tokens):
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape (1, T) with T >= 1, got {tuple(input_ids.shape)}.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be an integer >= 1, got {max_new_tokens}.")


def _prefill(model, input_ids, with_exit):
    """All prompt tokens but the last go into every layer's cache; the last one is fed by the first step."""
    cache = model.new_cache()
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
    _check_prompt(input_ids, max_new_tokens)
    policy = Policy(temperature, top_p, top_k)
    t0 = time.perf_counter()
    cache, n, last = _prefill(model, input_ids, with_exit=False)
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


@torch.inference_mode()
def speculative_generate(model, input_ids, max_new_tokens, *, gamma, temperature=0.0, top_p=1.0, top_k=0,
                         eos_token_id=None, generator=None):
    """Self-speculative decoding with `model` (a TruncatedLlama). Returns (new tokens, stats).

    Lossless: greedy returns exactly the autoregressive tokens; sampling returns exactly the target's distribution
    under the policy (temperature, then top-k, then top-p, applied alike to target p and draft q). A draft token x is
    accepted with probability min(1, p(x)/q(x)); the first rejection samples from normalise(max(0, p - q)); when all
    are accepted a bonus token is sampled from the next p. Greedy accepts while the draft equals argmax p.

    stats: new_tokens, target_calls (verification passes), drafted, accepted, avg_accepted (accepted drafts per
    target call), acceptance_rate (accepted / drafted), avg_overlap (mean over all drafted positions, accepted or
    not, of sum_x min(p, q), the expected acceptance probability; for greedy, p and q are the temperature-1
    softmaxes), avg_tv (1 - avg_overlap), accept_hist (cycles that accepted 0..gamma drafts), seconds,
    tokens_per_s, and per_cycle (accepted count of each cycle) and from_draft (per new token: came from the draft).
    """
    check_policy(gamma=gamma, temperature=temperature, top_p=top_p, top_k=top_k)
    _check_prompt(input_ids, max_new_tokens)
    policy = Policy(temperature, top_p, top_k)
    eos = _as_set(eos_token_id) if eos_token_id is not None else set()
    device = input_ids.device
    t0 = time.perf_counter()
    cache, n, last = _prefill(model, input_ids, with_exit=True)
    tokens, from_draft, per_cycle = [], [], []
    overlap_sum, drafted = 0.0, 0
    hist = [0] * (gamma + 1)
    done = False
    while not done and len(tokens) < max_new_tokens:
        g = min(gamma, max_new_tokens - len(tokens) - 1)  # the target always adds one token per cycle
        # draft g tokens, one at a time, keeping each position's layer-L state
        hidden, q_rows, drafts, tok = [], [], [], last
        for j in range(g):
            h, logits = model.draft_step(tok, cache, n + j)
            hidden.append(h)
            q_j = policy.probs(logits[0, -1:])  # computed once: sampled from now, compared with p below
            q_rows.append(q_j)
            pick = logits[0, -1:].argmax(-1) if policy.greedy else torch.multinomial(q_j, 1, generator=generator)
            tok = pick.view(1, 1)
            drafts.append(int(tok))
        h, _ = model.extend(tok, cache, n + g)  # the last draft token's shared layers (and exit blocks)
        hidden.append(h)
        # verify: the rest of the model on the g+1 saved states
        p_logits = model.verify(torch.cat(hidden, dim=1), cache, n)[0]
        p = policy.probs(p_logits)
        k = 0
        if g:
            q = torch.cat(q_rows)
            overlap_sum += torch.minimum(p[:g], q).sum(-1).sum().item()
            drafted += g
            target_choice = p_logits[:g].argmax(-1).tolist() if policy.greedy else None
            for j, x in enumerate(drafts):
                ok = (x == target_choice[j]) if policy.greedy else accept_draft(p[j, x], q[j, x], generator)
                if not ok:
                    break
                k += 1
        # the target's token: the correction at the first rejection, or the bonus after g acceptances
        if k < g and not policy.greedy:
            extra = int(torch.multinomial(residual_distribution(p[k], q[k]), 1, generator=generator))
        elif policy.greedy:
            extra = int(p_logits[k].argmax())
        else:
            extra = int(torch.multinomial(p[k], 1, generator=generator))
        new = drafts[:k] + [extra]
        hist[k] += 1
        per_cycle.append(k)
        for i, t in enumerate(new):
            tokens.append(t)
            from_draft.append(i < k)
            if t in eos:
                done = True
                break
        n += k + 1
        cache.crop(n)
        last = torch.tensor([[extra]], device=device)
    cycles = len(per_cycle)
    accepted = sum(per_cycle)
    avg_overlap = overlap_sum / drafted if drafted else float("nan")
    stats = {
        "target_calls": cycles, "drafted": drafted, "accepted": accepted,
        "avg_accepted": accepted / cycles if cycles else 0.0,
        "acceptance_rate": accepted / drafted if drafted else float("nan"),
        "avg_overlap": avg_overlap, "avg_tv": 1.0 - avg_overlap, "overlap_sum": overlap_sum,
        "accept_hist": hist, "per_cycle": per_cycle, "from_draft": from_draft[: len(tokens)],
        "cache_positions": [cache.length(i) for i in range(model.num_layers)],
    }
    return _finish(tokens, stats, t0, device)
