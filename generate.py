"""Self-speculative decoding: the KV-cached draft / verify loop on one shared model (batch size 1, as in gpt-fast).

    cache holds positions [0, n) in every layer; `last` is the newest committed token, not yet in the cache
    draft:   feed last, d1, .., d(g-1) through the shared layers + exit, one token at a time -> q1..qg, d1..dg
             feed dg through the shared layers too (its layer-L state is all verification still needs)
             (with draft_stop P: stop at the first q_j whose top probability is below P; g = j - 1 drafts)
    verify:  the remaining layers on the g+1 saved layer-L states at positions n..n+g   -> p1..p(g+1)
    accept:  k drafts by the speculative-sampling rule, then one token from the target (correction or bonus)
    commit:  crop every layer back to n+k+1 positions; last = the target's token

No layer ever recomputes a position, and after each cycle the cache holds exactly the committed tokens.

Reading order: `speculative_generate` (the loop) -> `speculate_cycle` (one cycle) -> `draft`, then sampling.py (the
policy and the acceptance rules, on the device); then trees of drafts (`tree_cycle`: `draft_tree`, one verify over
the tree, sampling.accept_tree), which the loop runs instead of a chain when tree_width > 1. A cycle reads back from
the device once (a tree: once per level and once for its walk), so a GPU runs ahead of Python (host_reads.py). The
model is anything with the `Steps` methods (truncated_llama's TruncatedLlama); this module needs neither the sweep
(evaluate.py) nor the trainer (train.py).
"""
import math
import statistics
import time
from typing import NamedTuple, Optional, Protocol

import torch

from cli import check_context, device_sync
from decode_engine import TreeRows
from prompt_lookup import Lookup
from results import cycle_stats, judged_drafts  # noqa: F401 (judged_drafts: part of the loop's API)
from sampling import Policy, accept_tree, judge_chain, read_chain, sample, walk_tables  # noqa: F401 (sample: API)


class Cache(Protocol):
    """Keys and values of every layer at positions [0, length)."""

    def length(self, layer: int = 0) -> int: ...

    def crop(self, n: int) -> None: ...

    def keep(self, n: int, positions: list) -> None: ...  # trees only: move `positions` to n.., drop the rest


class Steps(Protocol):
    """What the loop needs of a model: pieces of one forward pass, each on k new tokens at positions start.. (or, with
    `tree`, the k nodes of a draft tree written there; see decode_engine.TreeRows)."""
    config: object
    num_layers: int

    def new_cache(self, capacity: int = 256) -> Cache: ...

    def extend(self, input_ids: torch.Tensor, cache: Cache, start: int, *, with_exit: bool = True,
               tree: Optional[TreeRows] = None) -> tuple: ...

    def draft_step(self, input_ids: torch.Tensor, cache: Cache, start: int, *,
                   tree: Optional[TreeRows] = None) -> tuple: ...

    def verify(self, shared_hidden: torch.Tensor, cache: Cache, start: int, *,
               tree: Optional[TreeRows] = None) -> torch.Tensor: ...

    def full_step(self, input_ids: torch.Tensor, cache: Cache, start: int, *, with_exit: bool = False
                  ) -> torch.Tensor: ...


# ----------------------------------------------------------------------------------------------------------------
# The values the loop accepts (the policy and the rules themselves: sampling.py)

SWEEP_FLAGS = {"gamma": "--gammas", "temperature": "--temperatures", "top_p": "--top_p", "top_k": "--top_k",
               "draft_stop": "--draft_stop", "tree_width": "--tree_widths", "tree_nodes": "--tree_nodes",
               "draft": "--drafts", "lookup_tokens": "--lookup_tokens", "ngram": "--ngram"}
DRAFTS = ("exit", "lookup", "exit+lookup")  # the draft sources: the early exit, prompt lookup, both in one cycle


def check_policy(*, gamma: int = 1, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 draft_stop: float = 0.0, tree_width: int = 1, tree_nodes: int = 0, draft: str = "exit",
                 lookup_tokens: int = 0, ngram: int = 3, flags: dict = SWEEP_FLAGS) -> None:
    """Raise ValueError (one sentence, naming the command-line flag from `flags`) for values the loop cannot use."""
    if draft not in DRAFTS:
        raise ValueError(f"{flags.get('draft', '--drafts')}: the draft source must be one of {', '.join(DRAFTS)}, "
                         f"got {draft!r}.")
    if not isinstance(lookup_tokens, int) or isinstance(lookup_tokens, bool) or lookup_tokens < 0:
        raise ValueError(f"{flags.get('lookup_tokens', '--lookup_tokens')}: the lookup's proposal length must be an "
                         f"integer >= 0 (0: gamma), got {lookup_tokens}.")
    if not isinstance(ngram, int) or isinstance(ngram, bool) or not 1 <= ngram <= 16:
        raise ValueError(f"{flags.get('ngram', '--ngram')}: the lookup's longest n-gram must be an integer in 1..16, "
                         f"got {ngram}.")
    if draft == "lookup" and tree_width != 1:
        raise ValueError(f"{flags.get('tree_width', '--tree_widths')}: a lookup draft is a chain (tree width 1); "
                         f"trees need the exit (--drafts exit or exit+lookup), got width {tree_width}.")
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
    if not isinstance(tree_width, int) or isinstance(tree_width, bool) or tree_width < 1:
        raise ValueError(f"{flags.get('tree_width', '--tree_widths')}: tree_width (candidates per expanded node) must "
                         f"be an integer >= 1 (1: a chain), got {tree_width}.")
    if not isinstance(tree_nodes, int) or isinstance(tree_nodes, bool) or tree_nodes < 0:
        raise ValueError(f"{flags.get('tree_nodes', '--tree_nodes')}: tree_nodes (drafted nodes per cycle) must be an "
                         f"integer >= 0 (0: tree_width x gamma), got {tree_nodes}.")


# ----------------------------------------------------------------------------------------------------------------
# The loops


@torch.inference_mode()
def speculative_generate(model: Steps, input_ids: torch.Tensor, max_new_tokens: int, *, gamma: int,
                         temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                         eos_token_id: Optional[int | list[int]] = None, generator: Optional[torch.Generator] = None,
                         draft_stop: float = 0.0, tree_width: int = 1, tree_nodes: int = 0, draft: str = "exit",
                         lookup_tokens: int = 0, ngram: int = 3, timings: Optional[dict] = None) -> tuple:
    """Self-speculative decoding with `model` (a Steps: truncated_llama's TruncatedLlama). Returns (new tokens, stats).

    Lossless: greedy returns exactly the autoregressive tokens; sampling returns exactly the target's distribution
    under the policy (temperature, then top-k, then top-p, applied alike to target p and draft q). A draft token x is
    accepted with probability min(1, p(x)/q(x)); the first rejection samples from normalise(max(0, p - q)); when all
    are accepted a bonus token is sampled from the next p. Greedy accepts while the draft equals argmax p.

    Draft sources (`draft`): "exit" (the early exit drafts gamma tokens, one at a time, or a tree of depth gamma),
    "lookup" (prompt lookup, `Lookup`: up to `lookup_tokens` tokens, 0 meaning gamma, copied from where the newest
    `ngram`..1 tokens occurred before in prompt + reply; a proposal is deterministic, q one-hot, so x is accepted with
    probability p(x); no match: the cycle is one plain step), "exit+lookup" (a chain: the lookup's proposal when it
    has one, else the exit's chain; a tree, tree_width > 1: the exit's tree with the lookup's proposal grafted on as
    one more path, duplicates merged, all verified in one pass).

    Adaptive draft length (`draft_stop` P in (0, 1); 0 = off): gamma is then a cap, and a cycle stops drafting as soon
    as the draft is unsure: when the largest probability of its next-token distribution q falls below P, that token
    is not drafted and verification starts. q is the distribution the draft samples from and the rule compares with p:
    the policy's (temperature, top-k, top-p) when sampling, the temperature-1 softmax when greedy. The stop depends
    on q alone, never on p, so it is a choice the draft could have made by itself and the output stays exact (the
    draft step that decided to stop already ran that token through the shared layers: verification reuses it).

    stats: new_tokens, target_calls (verification passes), drafted, accepted, avg_accepted (accepted drafts per
    target call), acceptance_rate (accepted / drafted), avg_overlap (mean over all drafted positions, accepted or
    not, of sum_x min(p, q), the expected acceptance probability; for greedy, p and q are the temperature-1
    softmaxes; a lookup token's is p(x)), avg_tv (1 - avg_overlap), accept_hist (cycles that accepted 0.. drafts),
    draft_len_hist (cycles that drafted 0.. tokens), avg_draft_len (drafted / target calls), rejected (cycles that
    rejected a draft), seconds, tokens_per_s, and per_cycle (accepted count of each cycle), per_cycle_drafted
    (drafted count of each cycle) and from_draft (per new token: came from a draft), token_sources (per new token:
    "exit", "lookup", "both" (a tree node both proposed) or None (the target's own)), source_counts (those counted),
    cycle_kinds (per cycle: "exit" a chain, "tree", or "lookup"), lookup_matched (per cycle that consulted the lookup:
    whether it proposed anything), lookup_match_rate, lookup_seconds (the lookup's own time), accept_by_depth (per
    depth d: the cycles that accepted a d-th token over those that judged one).

    Trees (`tree_width` K > 1; see draft_tree and accept_tree): each cycle drafts a tree of depth at most gamma and at
    most `tree_nodes` nodes (0: K x gamma), verifies all of it in one pass and walks it by an exact multi-candidate
    rule. Their stats count nodes as drafted (draft_len_hist: cycles by nodes), add nodes_per_cycle and draft_rows_hist
    (draft steps by rows), and avg_overlap is over the expanded nodes. `timings` (a dict, opt-in) collects the seconds
    of each phase of a tree cycle: draft levels, verify, accept, cache moves.
    """
    check_policy(gamma=gamma, temperature=temperature, top_p=top_p, top_k=top_k, draft_stop=draft_stop,
                 tree_width=tree_width, tree_nodes=tree_nodes, draft=draft, lookup_tokens=lookup_tokens, ngram=ngram)
    _check_prompt(model, input_ids, max_new_tokens)
    policy = Policy(temperature, top_p, top_k, checked=True)
    eos = _as_set(eos_token_id) if eos_token_id is not None else set()
    t0 = time.perf_counter()
    budget = (tree_nodes or tree_width * gamma) if tree_width > 1 else gamma
    lookup_len = (lookup_tokens or gamma) if draft != "exit" else 0
    cache, n, last = _prefill(model, input_ids, with_exit=draft != "lookup", room=max_new_tokens,
                              drafts=budget + lookup_len + 1)
    root = int(last)  # the newest token's id, kept on the host from here (a tree's root)
    lookup, lookup_s, matched = None, 0.0, []
    if lookup_len:
        lap = time.perf_counter()
        lookup = Lookup(input_ids[0].tolist(), ngram)
        lookup_s += time.perf_counter() - lap
    tokens, sources, per_cycle, per_cycle_drafted, judged, rows, overlap_rows, kinds = [], [], [], [], [], [], 0, []
    # summed on the device in float64 (the same sums as Python floats), read once at the end: no sync per cycle
    overlap_sum = torch.zeros((), dtype=torch.float64, device=input_ids.device)
    done = False
    while not done and len(tokens) < max_new_tokens:
        room = max_new_tokens - len(tokens) - 1  # the target always adds one token per cycle
        g = min(gamma, room)
        proposal = []
        if lookup is not None and room > 0:
            lap = time.perf_counter()
            proposal = _cut_at(lookup.propose(min(lookup_len, room)), eos)
            lookup_s += time.perf_counter() - lap
            matched.append(bool(proposal))
        if draft == "lookup" or (proposal and tree_width == 1):
            cycle = lookup_cycle(model, policy, cache, n, last, proposal, generator, with_exit=draft != "lookup")
        elif tree_width > 1 and g > 0:
            cycle = tree_cycle(model, policy, cache, n, last, g, tree_width, budget, draft_stop, generator, timings,
                               graft=proposal, root=root)
        else:
            cycle = speculate_cycle(model, policy, cache, n, last, g, draft_stop, generator)
        k = cycle.accepted
        kinds.append(cycle.kind)
        per_cycle.append(k)
        per_cycle_drafted.append(cycle.nodes)
        judged.append(k + cycle.rejected)
        rows += cycle.level_rows
        overlap_sum += cycle.overlap
        overlap_rows += cycle.overlap_rows
        committed = cycle.drafts[:k] + [cycle.token]
        for i, t in enumerate(committed):
            tokens.append(t)
            sources.append(cycle.sources[i] if i < k else None)
            if t in eos:
                done = True
                break
        if cycle.path is not None:  # a tree: the accepted path's keys and values move to n.., the rest goes
            lap = _lap(timings, None, input_ids.device)
            cache.keep(n, [n + i for i in cycle.path])
            _lap(timings, "cache moves", input_ids.device, lap)
        n += k + 1
        cache.crop(n)  # rejected drafts' positions go
        root, last = cycle.token, torch.tensor([[cycle.token]], device=input_ids.device)  # a copy to the device
        if lookup is not None:
            lap = time.perf_counter()
            lookup.add(committed)
            lookup_s += time.perf_counter() - lap
    depth = max([gamma, lookup_len] + per_cycle)
    stats = cycle_stats(per_cycle, per_cycle_drafted, overlap_sum.item(), depth, judged, overlap_rows)
    if tree_width > 1:
        hist = [0] * (max(rows, default=0) + 1)
        for r in rows:
            hist[r] += 1
        stats.update(nodes_per_cycle=stats["drafted"] / max(len(per_cycle), 1), draft_rows_hist=hist,
                     tree_width=tree_width, tree_nodes=budget)
    stats.update(from_draft=[s is not None for s in sources], token_sources=sources, cycle_kinds=kinds,
                 source_counts={s: sum(x == s for x in sources) for s in ("exit", "lookup", "both")}
                 | {"target": sum(x is None for x in sources)},
                 lookup_matched=matched, lookup_match_rate=sum(matched) / len(matched) if matched else None,
                 lookup_seconds=lookup_s, cache_positions=[cache.length(i) for i in range(model.num_layers)])
    return _finish(tokens, stats, t0, input_ids.device)


def _cut_at(proposal: list, eos: set) -> list:
    """A proposal up to and including its first end-of-sequence token: nothing after it could be kept."""
    for i, t in enumerate(proposal):
        if t in eos:
            return proposal[: i + 1]
    return proposal


class Cycle(NamedTuple):
    """One draft-verify cycle: the drafted tokens (a tree's accepted path), how many the target accepted, the target's
    own token, and the sum over drafted positions (a tree's expanded nodes) of sum_x min(p, q), their expected
    acceptance (a 0-d tensor, or 0.0 with no draft), over `overlap_rows` rows. `rejected`: 1 when the last judged
    draft (a tree: every candidate at the last node reached) was rejected. `nodes`: the tokens drafted (a chain's
    drafts, a tree's nodes). `sources`: which source proposed each of `drafts`; `kind`: "exit" (a chain), "lookup"
    or "tree". A tree's cycle also has the accepted path (node indices from 0, the root) and the rows of each draft
    step."""
    drafts: list
    accepted: int
    token: int
    overlap: object
    overlap_rows: int = 0
    rejected: int = 0
    nodes: int = 0
    path: Optional[list] = None
    level_rows: tuple = ()
    sources: tuple = ()
    kind: str = "exit"


def speculate_cycle(model: Steps, policy: "Policy", cache: Cache, n: int, last: torch.Tensor, g: int,
                    draft_stop: float = 0.0, generator: Optional[torch.Generator] = None) -> Cycle:
    """Draft up to g tokens, verify them with the remaining layers in one pass, accept some: one Cycle. The cache
    then holds positions up to n + drafts; the caller crops it to what it commits. Drafts, their judgement and the
    target's token stay on the device until the cycle's one host read (read_chain)."""
    hidden, q_rows, drafts = draft(model, policy, cache, n, last, g, draft_stop, generator)
    p_logits = model.verify(torch.cat(hidden, dim=1), cache, n)[0]
    p = policy.probs(p_logits)
    q = torch.cat(q_rows) if q_rows else None
    d = drafts.shape[0]
    overlap = torch.minimum(p[:d], q).sum() if d else 0.0
    drafts, k, token = read_chain(drafts, *judge_chain(policy, p_logits, p, q, drafts, generator))
    return Cycle(drafts, k, token, overlap, d, int(k < d), d, sources=("exit",) * d)


def draft(model: Steps, policy: "Policy", cache: Cache, n: int, last: torch.Tensor, g: int, draft_stop: float = 0.0,
          generator: Optional[torch.Generator] = None) -> tuple:
    """Up to g draft tokens after `last` (positions n..), one at a time through the shared layers and the exit, each
    fed to the next step on the device (no host read). Returns (the layer-L states of `last` and of every draft, to
    verify; the drafts' q rows; the drafts, a (d,) tensor). With `draft_stop`, drafting ends when the draft's top
    probability falls below it (a host read per draft: the host decides whether to go on)."""
    hidden, q_rows, drafts, tok = [], [], [], last
    for j in range(g):
        h, logits = model.draft_step(tok, cache, n + j)
        hidden.append(h)
        q_j = policy.probs(logits[0, -1:])  # computed once: sampled from now, compared with p later
        if draft_stop and float(q_j.max()) < draft_stop:
            return hidden, q_rows, _stacked(drafts, last)  # `tok` already went through the shared layers (h)
        q_rows.append(q_j)
        tok = policy.draft_token(logits[0, -1:], q_j, generator).view(1, 1)
        drafts.append(tok)
    h, _ = model.extend(tok, cache, n + g)  # the last draft token's shared layers (and exit blocks)
    return hidden + [h], q_rows, _stacked(drafts, last)


def _stacked(tokens: list, like: torch.Tensor) -> torch.Tensor:
    return torch.cat(tokens).view(-1) if tokens else like.new_zeros(0)


# ----------------------------------------------------------------------------------------------------------------
# Prompt lookup (prompt_lookup.Lookup proposes; a proposal is verified as a draft whose q is one-hot)


def lookup_cycle(model: Steps, policy: "Policy", cache: Cache, n: int, last: torch.Tensor, proposal: list,
                 generator: Optional[torch.Generator] = None, with_exit: bool = True) -> Cycle:
    """Verify a deterministic proposal (prompt lookup's) with every layer in one pass: one Cycle.

    Its q is one-hot at each proposed token x, so the speculative-sampling rule accepts x with probability
    min(1, p(x) / 1) = p(x) and, at a rejection, samples from normalise(max(0, p - onehot(x))) = p without x,
    renormalised; greedy accepts while x = argmax p. The same rule as the exit's (judge_chain), so
    the output is exact for the same reason. An empty proposal makes this a plain one-token step. `with_exit`: also
    fill the exit's cache slots (when the exit drafts in later cycles)."""
    d = len(proposal)
    drafts = torch.tensor(proposal, dtype=torch.long, device=last.device)
    ids = torch.cat([last.view(1), drafts]).view(1, -1)
    p_logits = model.full_step(ids, cache, n, with_exit=with_exit)[0]
    p = policy.probs(p_logits)
    q, overlap = None, 0.0
    if d:
        rows = torch.arange(d, device=p.device)
        q = torch.zeros(d, p.shape[-1], dtype=p.dtype, device=p.device)
        q[rows, drafts] = 1.0
        overlap = p[rows, drafts].double().sum()  # sum_x min(p, onehot) = p(x): the expected acceptance
    drafts, k, token = read_chain(drafts, *judge_chain(policy, p_logits, p, q, drafts, generator))
    return Cycle(drafts, k, token, overlap, d, int(k < d), d, sources=("lookup",) * d, kind="lookup")


# ----------------------------------------------------------------------------------------------------------------
# Trees of drafts: several candidates per position, verified in one pass


class Tree:
    """One cycle's draft tree. Node 0 is `last`, the newest committed token (not yet in the cache); node i is written at
    cache position n + i (nodes are added level by level) and sits at RoPE position n + its depth. `logq`: the log of
    the draft's probability of the path to it, which alone decides what is kept and expanded."""

    def __init__(self, n: int, root: int, device: torch.device):
        self.n, self.device = n, device
        self.tokens, self.depth, self.logq, self.children = [root], [0], [0.0], [[]]
        self.ancestors = [{0}]  # each node's ancestors and itself
        self.source = [None]  # who proposed each node: "exit", "lookup" or "both"
        self.verify_rows = self.walk = None  # set by draft_tree once the tree is final (on the device)

    def add(self, parent: int, token: int, logq: float, source: str = "exit") -> int:
        i = len(self.tokens)
        self.tokens.append(token)
        self.depth.append(self.depth[parent] + 1)
        self.logq.append(logq)
        self.children.append([])
        self.children[parent].append(i)
        self.ancestors.append(self.ancestors[parent] | {i})
        self.source.append(source)
        return i

    def graft(self, path: list, source: str = "lookup") -> list:
        """Add a path of tokens below the root (prompt lookup's proposal), following the nodes already there while
        their tokens agree (a merged node is marked "both"), so no node has two children with one token. Returns the
        new nodes (consecutive indices)."""
        u, new = 0, []
        for tok in path:
            child = next((c for c in self.children[u] if self.tokens[c] == tok), None)
            if child is None:
                child = self.add(u, tok, 0.0, source)
                new.append(child)
            elif self.source[child] != source:
                self.source[child] = "both"
            u = child
        return new

    def rows(self, nodes: list) -> TreeRows:
        """The positions and mask of `nodes` (consecutive indices): each sees the prefix and its own ancestors. Built
        on the host from the tree's bookkeeping and copied to the device, where nothing is queued (right after a
        read): on a GPU a copy from pageable host memory waits for the queue."""
        n, width = self.n, nodes[-1] + 1
        mask = torch.zeros(len(nodes), n + width, dtype=torch.bool)
        mask[:, :n] = True
        for r, i in enumerate(nodes):
            mask[r, [n + a for a in self.ancestors[i]]] = True
        positions = [n + self.depth[i] for i in nodes]
        return TreeRows(torch.tensor(positions, device=self.device), mask.to(self.device), max(positions) + 1)


def draft_tree(model: Steps, policy: "Policy", cache: Cache, n: int, last: torch.Tensor, depth: int, width: int,
               budget: int, draft_stop: float = 0.0, timings: Optional[dict] = None, graft: list = (),
               root: Optional[int] = None) -> tuple:
    """A tree of drafts after `last` (its token id `root`, read from `last` when not given), one draft step per level
    over all of its nodes as rows. Each expanded node proposes its `width` most likely tokens by the draft's logits
    (at the policy's temperature, before top-k / top-p: a candidate outside q's nucleus can still be the target's
    token); of all proposals the `width` with the most likely paths are kept (EAGLE-2's rule), up to `budget` nodes;
    a node whose top probability under the policy is below `draft_stop` is not expanded. The choice is made on the
    device and read back once per level (the next level's rows are its size). `graft`: a path proposed by another
    source (prompt lookup), added below the root (Tree.graft). Only the drafts decide, so the output stays exact. The
    deepest level and the grafted nodes run the shared layers (and exit blocks) only, in one call. Returns (the tree,
    the layer-L states of every node in order, {node: its draft logits row}, the rows of each draft step)."""
    device = last.device
    tree = Tree(n, int(last) if root is None else root, device)
    hidden, q_logits, level, level_rows = [], {}, [0], []
    logq = torch.zeros(1, dtype=torch.float64, device=device)  # the level's path log-probabilities
    t0 = _lap(timings, None, device)
    for _ in range(depth):
        room = budget - (len(tree.tokens) - 1)
        if room <= 0:
            break  # `level` is still to run through the shared layers
        ids = torch.tensor([[tree.tokens[i] for i in level]], device=device)
        h, logits = model.draft_step(ids, cache, n + level[0], tree=tree.rows(level))
        hidden.append(h)
        level_rows.append(len(level))
        scores = logits[0].float() / (policy.temperature if not policy.greedy else 1.0)
        top, top_ids = scores.topk(min(width, scores.shape[-1]), dim=-1)
        top_logq = top - scores.logsumexp(-1, keepdim=True)
        expand = torch.ones(len(level), dtype=torch.bool, device=device)
        if draft_stop:  # q under the policy, compared in float64 as a Python float would be
            expand = policy.probs(logits[0]).amax(-1).double() >= draft_stop
        paths = (logq.view(-1, 1) + top_logq.double()).masked_fill(~expand.view(-1, 1) | (top_logq == -math.inf),
                                                                   -math.inf)  # a pruned head's tokens only
        best, flat = paths.view(-1).sort(descending=True, stable=True)  # ties: the earlier proposal first
        m = min(width, room, paths.numel())
        picked = torch.cat([best[:m], flat[:m].double(), top_ids.view(-1)[flat[:m]].double(), expand.double()])
        values = picked.tolist()  # the level's one host read
        best, flat, toks, expand = values[:m], values[m:2 * m], values[2 * m:3 * m], values[3 * m:]
        for r, i in enumerate(level):
            if expand[r]:
                q_logits[i] = logits[0, r:r + 1]
        kept = sorted((int(f), lq, int(t)) for lq, f, t in zip(best, flat, toks) if lq > -math.inf)
        if not kept:
            level = []  # every node of this level went through a draft step already
            break
        # by parent, each one's children most likely first (a flat index is parent row x width + rank)
        level = [tree.add(level[f // top_ids.shape[1]], tok, lq) for f, lq, tok in kept]
        logq = torch.tensor([tree.logq[i] for i in level], dtype=torch.float64, device=device)
    pending = level + tree.graft(list(graft))  # the newest level and the grafted path: consecutive new nodes
    # the tree is final: its verify rows and the walk's tables go to the device now, while nothing is queued
    tree.verify_rows, tree.walk = tree.rows(list(range(len(tree.tokens)))), walk_tables(tree, device)
    if pending:
        ids = torch.tensor([[tree.tokens[i] for i in pending]], device=device)
        h, _ = model.extend(ids, cache, n + pending[0], tree=tree.rows(pending))  # fills the exit blocks' cache too
        hidden.append(h)
    _lap(timings, "draft levels", device, t0)
    return tree, hidden, q_logits, level_rows


def tree_cycle(model: Steps, policy: "Policy", cache: Cache, n: int, last: torch.Tensor, depth: int, width: int,
               budget: int, draft_stop: float = 0.0, generator: Optional[torch.Generator] = None,
               timings: Optional[dict] = None, graft: list = (), root: Optional[int] = None) -> Cycle:
    """Draft a tree, verify every node in one pass of the remaining layers (tree mask, RoPE at n + depth), walk it:
    one Cycle, whose `path` the caller keeps in the cache (StaticCache.keep). The overlap stat is over the expanded
    nodes the walk reached."""
    tree, hidden, q_logits, level_rows = draft_tree(model, policy, cache, n, last, depth, width, budget, draft_stop,
                                                    timings, graft, root)
    t0 = _lap(timings, None, last.device)
    p_logits = model.verify(torch.cat(hidden, dim=1), cache, n, tree=tree.verify_rows)[0]
    t0 = _lap(timings, "verify", last.device, t0)
    path, token, rejected, p = accept_tree(policy, tree, p_logits, generator)
    _lap(timings, "accept", last.device, t0)
    seen = [u for u in path if u in q_logits]
    overlap = sum(torch.minimum(p[u:u + 1], policy.probs(q_logits[u])).sum() for u in seen) if seen else 0.0
    return Cycle([tree.tokens[i] for i in path[1:]], len(path) - 1, token, overlap, len(seen), rejected,
                 len(tree.tokens) - 1, path, tuple(level_rows), tuple(tree.source[i] for i in path[1:]), "tree")


def _lap(timings: Optional[dict], phase: Optional[str], device: torch.device, t0: float = 0.0) -> float:
    """Opt-in phase timing: with a `timings` dict, add the seconds since t0 to timings[phase] (device synchronised);
    returns the time now. Without one, nothing is synchronised or measured."""
    if timings is None:
        return 0.0
    device_sync(device)
    now = time.perf_counter()
    if phase is not None:
        timings[phase] = timings.get(phase, 0.0) + now - t0
    return now


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


SLACK = 64  # cache positions reserved past the new tokens for a cycle's drafts, in multiples of this


def _prefill(model, input_ids, with_exit, room=0, drafts=0):
    """All prompt tokens but the last go into every layer's cache; the last one is fed by the first step.
    `room`: positions the generation will add, `drafts`: how many more a cycle may write (the lean engine reserves
    them up front). The capacity is prompt + room + a multiple of SLACK, so that autoregressive and speculative
    decoding of one prompt get the same capacity, the span every attention call reads (decode_engine.StaticCache)."""
    cache = model.new_cache(input_ids.shape[1] + room + SLACK * (drafts // SLACK + 1))
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
# The step timer


@torch.inference_mode()
def step_times(model: Steps, input_ids: torch.Tensor, verify_sizes=(), repeats: int = 7, draft_sizes=()) -> tuple:
    """(seconds of one draft step, seconds of one autoregressive step, {k: seconds of a k-token full step},
    {r: seconds of an r-token draft step}): medians of warm calls of `draft_step` and `full_step` on a cache holding
    `input_ids`, interleaved so that load affects them alike. A k-token full step costs what verifying k - 1 drafts
    (or a tree of k - 1 nodes) does; an r-token draft step what a tree level of r nodes does."""
    cache, n, last = _prefill(model, input_ids, with_exit=True)
    steps = {"draft": lambda: model.draft_step(last, cache, n), 1: lambda: model.full_step(last, cache, n)}
    for k in verify_sizes:
        steps[k] = (lambda k=k: model.full_step(input_ids[:, n - k + 1:n + 1], cache, n))  # positions n..n+k-1
    for r in draft_sizes:
        steps[("draft", r)] = (lambda r=r: model.draft_step(input_ids[:, n - r + 1:n + 1], cache, n))
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
    return med["draft"], med[1], {k: med[k] for k in verify_sizes}, {r: med[("draft", r)] for r in draft_sizes}
