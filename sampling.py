"""The sampling policy and the exact acceptance rules, run on the device: what generate.py's loop judges drafts by.

    check_sampling    the values a policy accepts (one sentence naming the flag otherwise)
    Policy            temperature, top-k, top-p: logits -> the distribution a token is drawn from (p and q alike)
    judge_chain       a chain of drafts: k accepted (while equal to argmax p, or with probability min(1, p/q)), then
                      the target's token (the correction from normalise(max(0, p - q)), or the bonus from p)
    accept_tree       a tree of drafts: the walk from the root, several candidates a node (docs/design.md: exactness)
    Uniforms          a cycle's uniform numbers, drawn at once; the generator rewound to those used

Each rule keeps its drafts, decisions and random numbers on the device and hands the loop one tensor to read back a
cycle (read_chain; accept_tree's walk): on a GPU each read of a value is a stall (host_reads.py counts them).
"""
import math
from typing import Optional

import torch

from host_reads import to_device

SAMPLING_FLAGS = {"temperature": "--temperatures", "top_p": "--top_p", "top_k": "--top_k"}


def check_sampling(*, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, flags: dict = SAMPLING_FLAGS
                   ) -> None:
    """Raise ValueError (one sentence, naming the command-line flag from `flags`) for a policy no rule can use."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"{flags['temperature']}: temperature must be a number >= 0 (0 means greedy), "
                         f"got {temperature}.")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"{flags['top_p']}: top_p must be in (0, 1], got {top_p}.")
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"{flags['top_k']}: top_k must be an integer >= 0 (0 disables it), got {top_k}.")


class Policy:
    """How logits become a next-token distribution: temperature, then top-k, then top-p (transformers' order and
    rules: top-k keeps every token tied with the k-th; top-p keeps the smallest set of most likely tokens whose mass
    reaches top_p). Temperature 0 means greedy; its `probs` are the plain temperature-1 softmax.

    Sorting a 49,152-token vocabulary for top-p costs 3 ms on a CPU, a tenth of a decode step, and the speculative
    loop needs it for every draft and every verified position. So top-p looks at the most likely candidates first
    (torch.topk) and sorts the whole vocabulary only when they hold less than top_p of the mass: the same set.
    Both that check and top-k's check for ties read a value back to the host: free on a CPU, a stall on a GPU. On
    other devices (`SHORTCUTS`), top-p sorts the whole vocabulary (fast there) and top-k always keeps its ties through a
    masked sort: the same sets, no host read."""

    CANDIDATES = (64, 1024)  # top-p's first looks; then the whole vocabulary
    SHORTCUTS = ("cpu",)  # device types where top-k / top-p read a value back to skip work

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, *, checked: bool = False):
        if not checked:  # checked: the caller already ran check_sampling (generate.check_policy) on these values
            check_sampling(temperature=temperature, top_p=top_p, top_k=top_k)
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
        vocab, reads = scores.shape[-1], scores.device.type in self.SHORTCUTS
        if self.top_k:
            values, index = scores.topk(min(self.top_k, vocab), dim=-1)
            if not reads or bool((scores >= values[:, -1:]).sum() > values.numel()):  # ties with the k-th: keep all
                values, index = scores.masked_fill(scores < values[:, -1:], float("-inf")).sort(-1, descending=True)
            log_total = values.logsumexp(-1, keepdim=True)
        else:
            log_total = scores.logsumexp(-1, keepdim=True)
        if self.top_p >= 1.0:
            return values, index
        for n in (self.CANDIDATES if reads else ()) + (vocab,):
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

    def draft_token(self, logits: torch.Tensor, q: torch.Tensor, generator: Optional[torch.Generator] = None
                    ) -> torch.Tensor:
        """The draft's token (a (1,) tensor on the device, not read back) from its (1, V) logits and their
        probabilities q: argmax, or a sample from q."""
        return logits.argmax(-1) if self.greedy else sample(q, generator)


def sample(probs: torch.Tensor, generator: Optional[torch.Generator] = None, u: Optional[torch.Tensor] = None
           ) -> torch.Tensor:
    """One token id per row of `probs` (rows summing to 1, or to any positive total), drawn by inverting the
    cumulative distribution with one uniform number: what torch.multinomial does for one draw, at a twentieth of its
    cost on a 49,152-token row. A token of probability 0 is never drawn. `u`: the uniform numbers to use, shaped
    probs.shape[:-1] + (1,) (drawn from `generator` when None). Nothing is read back to the host."""
    cdf = probs.cumsum(-1)
    if u is None:
        u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device, dtype=cdf.dtype)
    picked = torch.searchsorted(cdf, u * cdf[..., -1:], right=True).squeeze(-1)
    last = probs.shape[-1] - 1
    top = last - (probs.flip(-1) > 0).int().argmax(-1)  # where u * total rounded up to the total: the last token with mass
    return torch.where(picked > last, top, picked)


def accept_draft(p_x: torch.Tensor, q_x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Accept a draft token x (sampled from q) with probability min(1, p(x) / q(x)), given a uniform number u per
    draft: a bool tensor, elementwise."""
    return u * q_x < p_x


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Where to sample after a rejection: normalise(max(0, p - q)), row by row; p itself where q covers p everywhere."""
    r = torch.clamp(p - q, min=0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total, p)


def _default_generator(device: torch.device) -> Optional[torch.Generator]:
    """The generator torch.rand uses on `device` when given none (None where this cannot say)."""
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return None


class Uniforms:
    """The uniform numbers of one cycle's judgement, drawn in one call on the device; `used(m)` then leaves the
    generator as if only the m numbers the judgement used had been drawn.

    The rule draws one number per judged draft (or tree candidate) and one for the target's token: how many is known
    only after judging, which happens on the device, without a host read. Drawing the most it can need and then
    rewinding the generator to exactly what was used keeps a seeded run's stream what it was when each number was
    drawn one at a time on the host (on a CPU generator, torch.rand(n) equals n single draws)."""

    def __init__(self, n: int, generator: Optional[torch.Generator], device: torch.device):
        self.generator = generator if generator is not None else _default_generator(device)
        self.state = self.generator.get_state() if self.generator is not None else None
        self.u = torch.rand(n, generator=self.generator, device=device)

    def at(self, i: torch.Tensor) -> torch.Tensor:
        """The number at a (0-d, device) index, as a (1,) tensor."""
        return self.u.index_select(0, i.view(1))

    def used(self, m: int) -> None:
        if self.state is not None:
            self.generator.set_state(self.state)
            if m:
                torch.rand(m, generator=self.generator, device=self.u.device)


def judge_chain(policy: "Policy", p_logits: torch.Tensor, p: torch.Tensor, q: Optional[torch.Tensor],
                drafts: torch.Tensor, generator: Optional[torch.Generator] = None) -> tuple:
    """Judge a chain of g drafts against the target on the device: (k accepted, the target's token, the Uniforms
    used or None), k and the token 0-d device tensors, nothing read back.

    Greedy: k = how many drafts equal argmax p, in order; the token is argmax p after them. Sampling: the k-th
    draft x is accepted with probability min(1, p(x) / q(x)) (one uniform per judged draft, stopping at the first
    rejection); then the correction from normalise(max(0, p - q)) at a rejection, or the bonus token from p when all
    were accepted. Uniforms.used(min(k + 1, g) + 1) rewinds the generator to the numbers really used."""
    g = drafts.shape[0]
    if policy.greedy:
        target = p_logits.argmax(-1)
        k = (drafts == target[:g]).int().cumprod(0).sum()
        return k, target.index_select(0, k.view(1))[0], None
    draws = Uniforms(g + 1, generator, p.device)
    p_k = p.index_select(0, torch.zeros((), dtype=torch.long, device=p.device).view(1))
    k = torch.zeros((), dtype=torch.long, device=p.device)
    if g:
        rows = torch.arange(g, device=p.device)
        k = accept_draft(p[rows, drafts], q[rows, drafts], draws.u[:g]).int().cumprod(0).sum()
        p_k = p.index_select(0, k.view(1))
        q_k = torch.cat([q, torch.zeros_like(q[:1])]).index_select(0, k.view(1))  # row g: all accepted, no q
        p_k = torch.where(k < g, residual_distribution(p_k, q_k), p_k)
    token = sample(p_k, u=draws.at(torch.clamp(k + 1, max=g)).view(1, 1))[0]
    return k, token, draws


def read_chain(drafts: torch.Tensor, k: torch.Tensor, token: torch.Tensor, draws: Optional[Uniforms]) -> tuple:
    """The cycle's one host read: (the drafts as a list, k, the target's token); the generator is then rewound to
    the uniform numbers the judgement used."""
    values = torch.cat([drafts.long(), k.long().view(1), token.long().view(1)]).tolist()
    drafts, k, token = values[:-2], values[-2], values[-1]
    if draws is not None:
        draws.used(min(k + 1, len(drafts)) + 1)
    return drafts, k, token


def walk_tables(tree, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The tree's structure for accept_tree's walk on the device: each node's children (-1 padded to the widest) and
    each node's token. Made on the host; draft_tree makes them before queuing its last step (on a GPU, a copy from
    pageable host memory waits for the queue)."""
    width = max(1, max(len(c) for c in tree.children))
    return (to_device([c + [-1] * (width - len(c)) for c in tree.children], device), to_device(tree.tokens, device))


def accept_tree(policy: Policy, tree, p_logits: torch.Tensor, generator: Optional[torch.Generator] = None
                ) -> tuple:
    """Walk the tree from the root with the target's p at each node; returns (the accepted path of nodes, the
    target's own token, 1 if the last node reached had candidates and all were rejected, p_at: p_at(u) is node u's
    p, a (1, V) row).

    Greedy: follow the child equal to argmax p. Sampling, at a node with candidates c1..cK (its children, fixed by
    the draft): r = p; accept c_i with probability r(c_i) / sum r, else set r(c_i) = 0 and go on; if every one is
    rejected, the token is drawn from r normalised. Each token comes out with probability exactly p (a proof is in
    docs/design.md), so the walk, node after node, samples the target's distribution.

    On a GPU the walk runs on the device, one step per depth with every candidate slot, its position kept as a device
    index (a step past the walk's end changes nothing), and is read back once: the path, the token, how many uniform
    numbers it used (Uniforms). Where reads are free (Policy.SHORTCUTS: a CPU) the same walk runs on the host
    (`_walk_on_host`), a few ms a cycle cheaper."""
    device, greedy = p_logits.device, policy.greedy
    if device.type in Policy.SHORTCUTS:  # where a read is free: the same walk on the host
        return _walk_on_host(policy, tree, p_logits, generator)
    kids, tokens = tree.walk if tree.walk is not None else walk_tables(tree, device)
    width, depth = kids.shape[1], max(tree.depth)
    p = policy.probs(p_logits)
    draws = None if greedy else Uniforms((depth + 1) * width + 1, generator, device)
    zero = torch.zeros((), dtype=torch.long, device=device)
    u, count, token, done, rejected, path = zero, zero, zero, zero.bool(), zero.bool(), []
    for _ in range(depth + 1):
        ku = kids.index_select(0, u.view(1))[0]  # u's children, -1 padded
        kt = tokens.index_select(0, ku.clamp(min=0))
        if greedy:
            final = p_logits.index_select(0, u.view(1))[0].argmax()
            hit = (ku >= 0) & (kt == final)
            nxt = torch.where(hit.any(), ku.index_select(0, hit.int().argmax().view(1))[0], -1)
        else:
            p_u = p.index_select(0, u.view(1))[0]
            r, nxt = p_u, torch.full((), -1, device=device)
            for w in range(width):
                tried = ~done & (ku[w] >= 0) & (nxt < 0)
                ok = accept_draft(r.index_select(0, kt[w].view(1))[0], r.sum(), draws.at(count)[0])
                nxt = torch.where(tried & ok, ku[w], nxt)
                r = torch.where(tried & ~ok, r.index_fill(0, kt[w].view(1), 0.0), r)
                count = count + tried
            final = sample(torch.where(r.sum() > 0, r, p_u), u=draws.at(count))
        stop = ~done & (nxt < 0)  # the walk ends at u: the target's token is drawn here
        token = torch.where(stop, final, token)
        rejected = torch.where(stop, ku[0] >= 0, rejected)
        count = count + stop
        done = done | stop
        u = torch.where(done, u, nxt)
        path.append(torch.where(done, -1, nxt))
    values = torch.cat([torch.stack(path), token.view(1), rejected.long().view(1), count.view(1)]).tolist()  # one read
    if draws is not None:
        draws.used(values[-1])
    return [0] + [i for i in values[:-3] if i >= 0], values[-3], values[-2], lambda u: p[u:u + 1]


def _walk_on_host(policy: Policy, tree, p_logits: torch.Tensor, generator: Optional[torch.Generator]) -> tuple:
    """accept_tree's walk, node by node in Python, where a host read costs nothing (a CPU, Policy.SHORTCUTS): the
    device walk runs every depth and candidate slot as a dozen small tensor ops (~2.5 ms a cycle on a CPU), and needs
    p at every node, where this one computes it only at the nodes the walk reaches (under top-p, p of a 49,152-token
    row costs a sort). The same rule and the same uniform number for each decision as the device walk (so a seeded
    run draws the same tokens, up to the rounding of the sums), the same return, p as the rows it computed."""
    children, tokens = tree.children, tree.tokens
    rows = {}

    def p_at(u: int) -> torch.Tensor:
        if u not in rows:
            rows[u] = policy.probs(p_logits[u:u + 1])
        return rows[u]

    if policy.greedy:
        best = p_logits.argmax(-1).tolist()
        u, path = 0, [0]
        while (nxt := next((c for c in children[u] if tokens[c] == best[u]), None)) is not None:
            u = nxt
            path.append(u)
        return path, best[u], int(bool(children[u])), p_at
    width = max(1, max(len(c) for c in children))
    us = Uniforms((max(tree.depth) + 1) * width + 1, generator, p_logits.device)
    draws = us.u.tolist()
    u, count, path = 0, 0, [0]
    while True:
        nxt, kids = None, children[u]
        if kids:  # p of u's candidates and its total, read at once
            p_u = p_at(u)
            values = torch.cat([p_u[0, [tokens[c] for c in kids]], p_u.sum().view(1)]).tolist()
            total = values[-1]
            for w, c in enumerate(kids):  # r(c) / sum r: r is p with the rejected candidates set to 0
                ok = accept_draft(values[w], total, draws[count])
                count += 1
                if ok:
                    nxt = c
                    break
                total -= values[w]
        if nxt is None:
            break
        u = nxt
        path.append(u)
    p_u = p_at(u)
    if children[u]:  # every candidate rejected: the token comes from r normalised (p where r has no mass left)
        r = p_u.index_fill(1, torch.tensor([tokens[c] for c in children[u]], device=p_u.device), 0.0)
        p_u = torch.where(r.sum() > 0, r, p_u)
    token = int(sample(p_u, u=us.u[count:count + 1].view(1, 1))[0])
    us.used(count + 1)
    return path, token, int(bool(children[u])), p_at
