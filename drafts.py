"""Draft sources: each way of drafting is one class behind one small interface (as transformers' candidate
generators): `propose` drafts for the current tokens, `commit` is told the tokens the loop kept. A source never runs
the verify or the acceptance rule: generate.py's loop verifies every Proposal in one pass and judges it through one
entry point (chains and trees alike), so a new source is one class here plus its name in `make_source`.

    ExitChain      the early exit drafts up to gamma tokens, one at a time (with draft_stop: fewer when unsure)
    ExitTree       the early exit drafts a tree: depth gamma, `width` candidates a node, at most `budget` nodes
    PromptLookup   prompt_lookup.Lookup's proposal, deterministic (no model call; q one-hot)
    Recycled       a tree from the target's own top-k next tokens of earlier passes, deterministic (no model call)
    ExitAndLookup  the lookup's proposal when it has one, else the exit's chain; with a tree: the exit's tree with
                   the lookup's proposal grafted on as one more path

A Proposal is what the verify and the rules need: the drafted tokens (a chain; a tree keeps its own), the draft's
q rows (None: deterministic, judged with q one-hot), the layer-L states when the drafts already ran the shared
layers (None: the verify runs every layer on the tokens), and which source proposed each token.
"""
import collections
import itertools
import math
import statistics
import time
from typing import NamedTuple, Optional

import torch

from cli import lap
from decode_engine import TreeRows
from host_reads import to_device
from prompt_lookup import Lookup
from sampling import walk_tables



class Kind(NamedTuple):
    """What a draft source is, for the sweep's cells, tables and cost model (which never test its name): whether it
    drafts with the early exit (a cell needs an exit layer; q exists, so draft_stop applies), whether prompt lookup
    proposes (a lookup length and cost), whether a tree's node budget applies (--tree_nodes; every source drafts
    trees, lookup's by its branches alone), its label in tables ({exit}: the exit's) and its
    description in a demo's heading ({exit}: the exit's layer of the model's, {ngram}: the lookup's)."""
    exit: bool
    lookup: bool
    nodes: bool
    label: str
    describe: str


SOURCES = {"exit": Kind(True, False, True, "{exit}", "exit layer {exit}"),
           "lookup": Kind(False, True, False, "lookup", "prompt lookup (n-gram {ngram})"),
           "exit+lookup": Kind(True, True, True, "{exit} + lookup", "exit layer {exit} + prompt lookup"),
           "recycle": Kind(False, False, True, "recycled",
                           "recycled predictions (the target's own earlier top next tokens)"),
           "auto": Kind(True, True, True, "auto: {exit}",
                        "auto (prompt lookup, recycled predictions, exit layer {exit}, chosen each cycle)")}
DRAFTS = tuple(SOURCES)  # the names `make_source` reads


class Turn(NamedTuple):
    """Where the loop stands when it asks for a proposal: the cache holds positions [0, n); `last` (a (1, 1) device
    tensor, token id `root` on the host) is the newest committed token, not yet in the cache; `room` more drafts fit
    before max_new_tokens (the target always adds one)."""
    model: object
    policy: object
    cache: object
    n: int
    last: torch.Tensor
    root: int
    room: int
    generator: Optional[torch.Generator] = None
    timings: Optional[dict] = None


class Proposal(NamedTuple):
    """One cycle's drafts, as the verify and the rules take them. A chain: `tokens` (d,) on the device, `q` its (d, V)
    draft distributions or None (deterministic: q one-hot), `hidden` the layer-L states of `last` and every draft
    (the verify runs the remaining layers) or None (the verify runs every layer on last + tokens, `with_exit`: also
    filling the exit's cache). A tree: `tree` (its tokens, parents, sources and verify rows), `hidden`, and `q_logits`
    {node: its draft logits row}; `level_rows` the rows of each draft step. `sources`: who proposed each chain token
    (a tree keeps its own); `kind`: "exit", "lookup" or "tree" (the stats' cycle kinds)."""
    tokens: Optional[torch.Tensor]
    q: Optional[torch.Tensor] = None
    hidden: Optional[list] = None
    sources: tuple = ()
    kind: str = "exit"
    with_exit: bool = True
    tree: Optional["Tree"] = None
    q_logits: Optional[dict] = None
    level_rows: tuple = ()


class DraftSource:
    """The interface: `propose(turn) -> Proposal`, `commit(tokens, cycle)` after each cycle (the tokens kept and the
    generate.Cycle record: what was accepted), `stats(cycles)` for the loop's stats. `uses_exit`: the exit's cache is
    filled from the prefill on; `max_rows`: the most drafts a cycle writes to the cache (the lean engine reserves
    them); `depth`: the longest path a cycle can accept."""
    uses_exit = True
    observes = False  # True: `observe` is given every verified row's input token and target logits
    max_rows = 0
    depth = 0

    def propose(self, turn: Turn) -> Proposal:
        raise NotImplementedError

    def commit(self, tokens: list, cycle) -> None:
        pass

    def observe(self, inputs: torch.Tensor, logits: torch.Tensor) -> None:
        pass

    def stats(self, cycles: list) -> dict:
        return {}


# ----------------------------------------------------------------------------------------------------------------
# The early exit: a chain


class ExitChain(DraftSource):
    """Up to gamma drafts from the early exit, one draft step each (`draft`)."""

    def __init__(self, gamma: int, draft_stop: float = 0.0):
        self.gamma, self.draft_stop = gamma, draft_stop
        self.max_rows = self.depth = gamma

    def propose(self, turn: Turn, g: Optional[int] = None, stop=None) -> Proposal:
        g = min(self.gamma, turn.room) if g is None else g
        hidden, q_rows, drafts = draft(turn.model, turn.policy, turn.cache, turn.n, turn.last, g,
                                       self.draft_stop if stop is None else stop, turn.generator)
        q = torch.cat(q_rows) if q_rows else None
        return Proposal(drafts, q, hidden, ("exit",) * drafts.shape[0])


def draft(model, policy, cache, n: int, last: torch.Tensor, g: int, draft_stop=0.0,
          generator: Optional[torch.Generator] = None) -> tuple:
    """Up to g draft tokens after `last` (positions n..), one at a time through the shared layers and the exit, each
    fed to the next step on the device (no host read). Returns (the layer-L states of `last` and of every draft, to
    verify; the drafts' q rows; the drafts, a (d,) tensor). With `draft_stop` P, drafting ends when the draft's top
    probability falls below P (a host read per draft: the host decides whether to go on); a callable draft_stop(j,
    top) decides instead whether to stop before the j-th draft (0-based), given its q's top probability."""
    hidden, q_rows, drafts, tok = [], [], [], last
    for j in range(g):
        h, logits = model.draft_step(tok, cache, n + j)
        hidden.append(h)
        q_j = policy.probs(logits[0, -1:])  # computed once: sampled from now, compared with p later
        if draft_stop and (draft_stop(j, float(q_j.max())) if callable(draft_stop) else
                           float(q_j.max()) < draft_stop):
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


class PromptLookup(DraftSource):
    """Up to `tokens` tokens that followed the newest n-gram's latest earlier occurrence in prompt + reply, cut after
    an end-of-sequence token. No match: an empty proposal, and the cycle is one plain step. `uses_exit`: whether the
    exit's cache is filled too (when the exit drafts in other cycles: ExitAndLookup). With `branches` B > 1: up to B
    distinct continuations of that n-gram (Lookup.branches: the latest, then the most frequent), a deterministic tree
    verified in one pass (a chain when only one continuation exists)."""

    def __init__(self, prompt, tokens: int, ngram: int = 3, eos: frozenset = frozenset(), uses_exit: bool = False,
                 branches: int = 1):
        self.tokens, self.eos, self.uses_exit, self.branches = tokens, eos, uses_exit, branches
        self.depth, self.max_rows = tokens, tokens * branches
        self.matched, self.seconds = [], 0.0  # per cycle that consulted it: whether it proposed; its own time
        t = time.perf_counter()
        self.index = Lookup(prompt.tolist() if torch.is_tensor(prompt) else list(prompt), ngram)
        self.seconds += time.perf_counter() - t

    def tokens_for(self, room: int) -> list:
        """The proposal as token ids (host), counted in `matched`; nothing when no draft fits."""
        paths = self._consult(room, lambda k: [p] if (p := self.index.propose(k)) else [])
        return paths[0] if paths else []

    def branches_for(self, room: int, b: int) -> list:
        """Up to b distinct proposals (Lookup.branches), each cut like `tokens_for`'s, counted once in `matched`."""
        return self._consult(room, lambda k: self.index.branches(k, b))

    def _consult(self, room: int, find) -> list:
        """`find(k)`'s proposals of up to k tokens, cut after an end-of-sequence token, timed, counted in `matched`
        (one entry per cycle with room for a draft)."""
        if room <= 0:
            return []
        t = time.perf_counter()
        paths = [_cut_at(p, self.eos) for p in find(min(self.tokens, room))]
        self.seconds += time.perf_counter() - t
        self.matched.append(bool(paths))
        return paths

    def propose(self, turn: Turn) -> Proposal:
        if self.branches == 1:
            return self.deterministic(turn, self.tokens_for(turn.room))
        paths = self.branches_for(turn.room, self.branches)
        if len(paths) <= 1:  # one continuation: a chain (no tree mask to build)
            return self.deterministic(turn, paths[0] if paths else [])
        tree = Tree(turn.n, turn.root, turn.last.device)
        for path in paths:  # distinct paths: the ones sharing a prefix share its nodes
            tree.graft(path)
        return deterministic_tree(tree, self.uses_exit)

    def deterministic(self, turn: Turn, proposal: list) -> Proposal:
        return deterministic_chain(turn, proposal, ("lookup",) * len(proposal), "lookup", self.uses_exit)

    def commit(self, tokens: list, cycle=None) -> None:
        t = time.perf_counter()
        self.index.add(tokens)
        self.seconds += time.perf_counter() - t

    def stats(self, cycles: list) -> dict:
        m = self.matched
        return dict(lookup_matched=m, lookup_match_rate=sum(m) / len(m) if m else None, lookup_seconds=self.seconds)


def deterministic_chain(turn: Turn, tokens: list, sources: tuple, kind: str, uses_exit: bool) -> Proposal:
    """Drafts with no q (lookup's, auto's path; no tokens: a plain step), verified on every layer with `last` in one
    call and judged with q one-hot."""
    return Proposal(to_device(tokens, turn.last.device), None, None, sources, kind, with_exit=uses_exit)


def exit_tree_proposal(drafted: tuple) -> Proposal:
    """draft_tree's result (the tree, the layer-L states, the draft logits, the rows of each step) as a Proposal."""
    tree, hidden, q_logits, level_rows = drafted
    return Proposal(None, None, hidden, kind="tree", tree=tree, q_logits=q_logits, level_rows=tuple(level_rows))


def nodes_per_cycle(cycles: list) -> float:
    """Drafted tokens (a tree's nodes) per cycle."""
    return sum(c.nodes for c in cycles) / max(len(cycles), 1)


def _cut_at(proposal: list, eos: frozenset) -> list:
    """A proposal up to and including its first end-of-sequence token: nothing after it could be kept."""
    for i, t in enumerate(proposal):
        if t in eos:
            return proposal[: i + 1]
    return proposal


# ----------------------------------------------------------------------------------------------------------------
# Trees of drafts: several candidates per position, verified in one pass


class ExitTree(DraftSource):
    """A tree from the early exit (`draft_tree`): depth gamma, `width` candidates per expanded node, at most `budget`
    nodes. With no room for a draft, the cycle is a plain step (the chain's, with no draft)."""

    def __init__(self, gamma: int, width: int, budget: int, draft_stop: float = 0.0):
        self.gamma, self.width, self.budget, self.draft_stop = gamma, width, budget, draft_stop
        self.max_rows, self.depth = budget, gamma
        self.chain = ExitChain(gamma, draft_stop)

    def propose(self, turn: Turn, graft=None) -> Proposal:
        g = min(self.gamma, turn.room)
        if g <= 0:
            return self.chain.propose(turn, g=0)
        return exit_tree_proposal(draft_tree(turn.model, turn.policy, turn.cache, turn.n, turn.last, g, self.width,
                                             self.budget, self.draft_stop, turn.timings, graft, turn.root))

    def stats(self, cycles: list) -> dict:
        rows = [r for c in cycles for r in c.level_rows]
        hist = [0] * (max(rows, default=0) + 1)
        for r in rows:
            hist[r] += 1
        return dict(nodes_per_cycle=nodes_per_cycle(cycles), draft_rows_hist=hist, tree_width=self.width,
                    tree_nodes=self.budget)


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

    def child(self, parent: int, token: int, source: str) -> int:
        """The parent's child with this token: the one already there (marked "both" when another source proposed
        it: no node has two children with one token), else a new node."""
        child = next((c for c in self.children[parent] if self.tokens[c] == token), None)
        if child is None:
            return self.add(parent, token, 0.0, source)
        if self.source[child] != source:
            self.source[child] = "both"
        return child

    def graft(self, path: list, source: str = "lookup") -> None:
        """Add a path of tokens below the root (prompt lookup's proposal), following the nodes already there while
        their tokens agree."""
        u = 0
        for tok in path:
            u = self.child(u, tok, source)

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
        return TreeRows(to_device(positions, self.device), mask.to(self.device), max(positions) + 1)


def draft_tree(model, policy, cache, n: int, last: torch.Tensor, depth: int, width: int, budget: int,
               draft_stop: float = 0.0, timings: Optional[dict] = None, graft=None,
               root: Optional[int] = None) -> tuple:
    """A tree of drafts after `last` (its token id `root`, read from `last` when not given), one draft step per level
    over all of its nodes as rows. Each expanded node proposes its `width` most likely tokens by the draft's logits
    (at the policy's temperature, before top-k / top-p: a candidate outside q's nucleus can still be the target's
    token); of all proposals the `width` with the most likely paths are kept (EAGLE-2's rule), up to `budget` nodes; a
    node whose top probability under the policy is below `draft_stop` is not expanded. The choice is made on the
    device and read back once per level (the next level's rows are its size). `graft(tree)`: adds what other sources
    propose (lookup's path: Tree.graft) once the exit's levels are drafted. Only the drafts decide, so the output
    stays exact. The deepest level and the grafted nodes run the shared layers (and exit blocks) only, in one call.
    Returns (the tree, the layer-L states of every node in order, {node: its draft logits row}, the rows of each draft
    step)."""
    device = last.device
    tree = Tree(n, int(last) if root is None else root, device)
    hidden, q_logits, level, level_rows = [], {}, [0], []
    logq = torch.zeros(1, dtype=torch.float64, device=device)  # the level's path log-probabilities
    t0 = lap(timings, None, device)
    for _ in range(depth):
        room = budget - (len(tree.tokens) - 1)
        if room <= 0:
            break  # `level` is still to run through the shared layers
        ids = to_device([[tree.tokens[i] for i in level]], device)
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
        logq = to_device([tree.logq[i] for i in level], device, torch.float64)
    drafted = len(tree.tokens)
    if graft is not None:
        graft(tree)
    pending = level + list(range(drafted, len(tree.tokens)))  # the newest level and the grafted nodes: consecutive
    # the tree is final: its verify rows and the walk's tables go to the device now, while nothing is queued
    tree.verify_rows, tree.walk = tree.rows(list(range(len(tree.tokens)))), walk_tables(tree, device)
    if pending:
        ids = to_device([[tree.tokens[i] for i in pending]], device)
        h, _ = model.extend(ids, cache, n + pending[0], tree=tree.rows(pending))  # fills the exit blocks' cache too
        hidden.append(h)
    lap(timings, "draft levels", device, t0)
    return tree, hidden, q_logits, level_rows


# ----------------------------------------------------------------------------------------------------------------
# Recycled predictions: the target's own earlier top-k, a tree at no model cost


class Recycled(DraftSource):
    """Token Recycling's draft: for every token id, the target's `top` most likely next tokens from the latest
    verify pass that saw it as an input (every verified row: rejected drafts and tree nodes too; the prefill for the
    prompt's tokens), a (vocabulary, top) table kept on the device (`observe`). A cycle drafts a tree from the newest
    token by breadth-first expansion: each node's `width` first entries, to depth gamma, at most `budget` nodes,
    gathered on the device level by level and read back once. The proposal is deterministic (no q): the tree walk's
    rule (sampling.accept_tree) is exact for any candidates fixed before p is seen, and these come from earlier
    passes only. No entry yet for the newest token: a plain step."""
    uses_exit, observes = False, True

    def __init__(self, gamma: int, width: int, budget: int, top: int = 8, uses_exit: bool = False):
        self.gamma, self.width, self.budget, self.top = gamma, width, budget, max(top, width)
        self.max_rows, self.depth, self.uses_exit = budget, gamma, uses_exit
        self.table = None  # (vocabulary, top) long; -1: no prediction seen yet

    def observe(self, inputs: torch.Tensor, logits: torch.Tensor) -> None:
        """inputs (k,) token ids and their (k, V) target logits: each id's row becomes the logits' top entries."""
        if self.table is None:
            vocab = logits.shape[-1]
            self.top = min(self.top, vocab)
            self.table = torch.full((vocab, self.top), -1, dtype=torch.long, device=logits.device)
        self.table.index_copy_(0, inputs.view(-1), logits.topk(self.top, dim=-1).indices)

    def candidates(self, turn: Turn, depth: int, width: int, budget: int) -> list:
        """Up to `budget` nodes breadth first from the newest token, to `depth`, `width` children a node, as (parent:
        an index into this list or -1 for the root, token, depth, rank among its siblings); gathered on the device
        level by level, read back once. Empty when the table has nothing for the newest token."""
        if depth <= 0 or budget <= 0 or self.table is None:
            return []
        width = min(width, self.top)
        levels, frontier, total = [], turn.last.view(1), 0
        for _ in range(depth):  # each level's tokens from its parents' rows
            kids = self.table.index_select(0, frontier.clamp(min=0))[:, :width]
            kids = kids.masked_fill((frontier < 0).view(-1, 1), -1).reshape(-1)[: budget - total]
            levels.append(kids)
            total += kids.shape[0]
            if total >= budget:
                break
            frontier = kids
        values = torch.cat(levels).tolist()  # the one read of the drafts
        nodes, parents, start = [], [-1], 0
        for d, kids in enumerate(levels, 1):
            level = []
            for j, tok in enumerate(values[start:start + kids.shape[0]]):
                parent = parents[j // width]
                if tok >= 0 and parent is not None:
                    nodes.append((parent, tok, d, j % width))
                    level.append(len(nodes) - 1)
                else:
                    level.append(None)
            parents, start = level, start + kids.shape[0]
        return nodes

    def propose(self, turn: Turn) -> Proposal:
        plain = deterministic_chain(turn, [], (), "recycled", self.uses_exit)
        nodes = self.candidates(turn, min(self.gamma, turn.room), self.width, self.budget)
        if not nodes:
            return plain
        tree, index = Tree(turn.n, turn.root, turn.last.device), []
        for parent, tok, _, _ in nodes:
            index.append(tree.add(0 if parent < 0 else index[parent], tok, 0.0, "recycled"))
        return deterministic_tree(tree, self.uses_exit)

    def stats(self, cycles: list) -> dict:
        return dict(nodes_per_cycle=nodes_per_cycle(cycles), tree_width=self.width, tree_nodes=self.budget)


def deterministic_tree(tree: "Tree", uses_exit: bool) -> Proposal:
    """A tree of proposals with no q (recycled, lookup), verified on every layer in one call and walked."""
    tree.verify_rows, tree.walk = tree.rows(list(range(len(tree.tokens)))), walk_tables(tree, tree.device)
    return Proposal(None, kind="tree", with_exit=uses_exit, tree=tree, q_logits={})


# ----------------------------------------------------------------------------------------------------------------
# Both in one cycle


class ExitAndLookup(DraftSource):
    """The lookup's proposal when it has one, else the exit's chain (`exit` an ExitChain); with an ExitTree, the
    exit's tree with the lookup's proposal grafted on below the root (duplicates merged), verified in one pass."""

    def __init__(self, exit: DraftSource, lookup: PromptLookup):
        self.exit, self.lookup = exit, lookup
        self.max_rows, self.depth = exit.max_rows + lookup.max_rows, max(exit.depth, lookup.depth)

    def propose(self, turn: Turn) -> Proposal:
        proposal = self.lookup.tokens_for(turn.room)
        if isinstance(self.exit, ExitTree):
            return self.exit.propose(turn, graft=lambda tree: tree.graft(proposal))
        return self.lookup.deterministic(turn, proposal) if proposal else self.exit.propose(turn)

    def commit(self, tokens: list, cycle=None) -> None:
        self.lookup.commit(tokens)

    def stats(self, cycles: list) -> dict:
        return self.exit.stats(cycles) | self.lookup.stats(cycles)


# ----------------------------------------------------------------------------------------------------------------
# Auto: each cycle, the proposal that promises the most tokens per unit of this machine's time


class AutoDraft(DraftSource):
    """Each cycle, from every source it has, the proposal with the most expected committed tokens per second: a
    deterministic tree (prompt lookup's continuations, up to BRANCHES of them, and the recycled tree, merged; a chain,
    "path", when the nodes chosen form one path: no tree to build or walk), the exit's chain of g drafts, both in one
    tree (the exit's g likeliest tokens, one per level, with the deterministic nodes grafted on, all verified in one
    pass; with one exit draft, optionally also the exit's runner-up, its second likeliest token, as a sibling: the
    exit's two candidates the static "tree 2" cell drafts), or nothing (a plain step).

    A node's chance to be accepted once its parent is: an estimate per key learned online from earlier cycles (Beta:
    (accepted + 2 prior) / (judged + 2)), times its parent's. Keys: ("lookup", depth, rank among the continuations, the
    matched n-gram's length), ("recycled", depth, rank among siblings), ("exit", depth, 0) for the exit's sampled chain,
    ("exit", depth, "top") for its likeliest token in a tree (greedy: the chain's too) and RUNNER_UP for its runner-up.
    A sibling's chance is that it is the child accepted, so siblings' chances add up. Every count decays by DECAY a
    cycle. The deterministic tree keeps its k likeliest nodes (a parent is always likelier than its child); for every g
    (exit drafts) and k the value is (1 + the expected accepted) / (steps_seconds(g, k) + extra), a plain step's 1 /
    (one step + extra), and the best is taken. When that is the exit's chain, its length is then decided draft by draft
    from the exit's own q (`exit_stop`: each draft's chance learned per depth and bucket of q's top probability,
    ("exit", depth, "q", bucket)), up to gamma. v and c are this machine's (`measure(rows)`: generate.step_costs, a
    k-row full step over one row, a draft step over a full one, and a full step's seconds, measured once per model);
    `extra` is what each kind of cycle took beyond its steps in earlier cycles, timed on the host (the loop's Python,
    the lookup, the tree's tables), so a choice that pays in steps but not in seconds is not made. Every choice uses
    only earlier cycles and the drafts themselves, never this cycle's p, so greedy and sampled output stay exact (the
    rules judge whatever is proposed: a chain by the speculative-sampling rule, a tree by the multi-candidate walk)."""
    observes = True
    RUNNER_UP = ("exit", 1, "second")  # the key of the exit's second likeliest token beside its one draft
    PRIOR = {"lookup": 0.5, "recycled": 0.2, "exit": 0.5, RUNNER_UP: 0.2}  # a first cycle's guesses, worth two
    # observations: per source (a key's first field), or per key
    BRANCHES = 3  # lookup's distinct continuations of the matched n-gram (Lookup.branches), newest first
    OVERHEAD_CYCLES = (3, 9)  # a kind's overhead: none before 3 of its cycles, then the median of its latest 9
    CARRY = 0.5  # the weight of earlier generations' counts when a generation starts
    Q_EDGES = (0.9, 0.7, 0.5, 0.3, 0.0)  # the exit's top probability q_max, in buckets: the first edge <= q_max
    DECAY = 0.96  # every count, after each cycle: the latest ~25 cycles weigh most (the text changes within a reply),
    # and an estimate no longer observed drifts back to its prior, so that a source ruled out early is tried again

    def __init__(self, prompt, gamma: int, budget: int, lookup_tokens: int, measure, ngram: int = 3,
                 eos: frozenset = frozenset(), width: int = 4, memory: Optional[dict] = None):
        self.lookup = PromptLookup(prompt, lookup_tokens, ngram, eos, uses_exit=True)
        self.recycled = Recycled(gamma, width, budget, uses_exit=True)
        self.exit = ExitChain(gamma)
        self.gamma, self.budget, self.width, self.measure, self.costs = gamma, budget, width, measure, None
        self.max_rows = budget + self.BRANCHES * lookup_tokens + gamma + 1  # + 1: the exit's runner-up
        self.depth = max(gamma, lookup_tokens)
        memory = {} if memory is None else memory  # what earlier generations learned (generate.learned): shared
        self.counts = memory.setdefault("counts", {})  # key -> [accepted, judged]
        for a in self.counts.values():  # earlier generations' counts weigh CARRY: the newest text weighs most
            a[0], a[1] = a[0] * self.CARRY, a[1] * self.CARRY
        self.last = None  # what the last cycle proposed: ("tree", [(node, parent, key)]) or ("exit", [the q bucket of
        # each draft], the most drafts it could make)
        self.choices = {"path": 0, "tree": 0, "exit": 0, "exit+tree": 0, "none": 0}
        self.overhead = memory.setdefault("overhead", {})  # choice -> seconds its latest cycles took beyond their
        # steps' (OVERHEAD_CYCLES), kept across generations as the counts are
        self.pending = None  # the cycle in flight: (its choice, g exit drafts, k other nodes, when it began, the
        # tokens it promised)
        self.promise = {}  # choice -> [cycles, tokens promised, tokens committed]
        self.chain_key = 0  # the exit chain's key: 0 (sampled drafts), "top" when greedy (the likeliest token)
        self.runner_up = [0, 0]  # cycles that drafted the exit's runner-up, and that accepted it

    def chance(self, key: tuple) -> float:
        a, j = self.counts.get(key, (0, 0))
        return (a + 2 * self.PRIOR.get(key, self.PRIOR[key[0]])) / (j + 2)

    def observe(self, inputs: torch.Tensor, logits: torch.Tensor) -> None:
        self.recycled.observe(inputs, logits)

    def candidates(self, turn: Turn) -> list:
        """The deterministic candidates, parents first: (parent: an index into the list or -1 for the root, token,
        key, the chance of its path); a token both sources propose at one place is one entry (the first key)."""
        cand = []  # (parent: an index into cand or -1 for the root, token, key)
        paths = self.lookup.branches_for(turn.room, self.BRANCHES)
        matched = self.lookup.index.longest_match() if paths else 0
        for rank, path in enumerate(paths):
            for d, tok in enumerate(path, 1):
                cand.append((len(cand) - 1 if d > 1 else -1, tok, ("lookup", d, rank, matched)))
        base = len(cand)
        for parent, tok, d, rank in self.recycled.candidates(turn, min(self.gamma, turn.room), self.width,
                                                             self.budget):
            cand.append((parent + base if parent >= 0 else -1, tok, ("recycled", d, rank)))
        entries, where, seen = [], {-1: -1}, {}
        for i, (parent, tok, key) in enumerate(cand):
            pe = where.get(parent)
            if pe is not None and (pe, tok) not in seen:
                seen[(pe, tok)] = len(entries)
                entries.append((pe, tok, key, (entries[pe][3] if pe >= 0 else 1.0) * self.chance(key)))
            where[i] = seen.get((pe, tok)) if pe is not None else None
        return entries

    def propose(self, turn: Turn) -> Proposal:
        if self.costs is None:
            self.costs = monotone(self.measure(self.max_rows + 1))  # (c, {k: v(k)}, seconds of a full step)
        began = time.perf_counter()
        extra = {choice: self.extra(choice) for choice in self.choices}
        entries = self.candidates(turn)
        ranked = sorted(range(len(entries)), key=lambda e: -entries[e][3])  # stable: a parent before its child
        tree_gain = list(itertools.accumulate((entries[e][3] for e in ranked), initial=0.0))  # the top k's
        parents = [entries[e][0] for e in ranked]  # the top k are one path while no two share a parent
        path_k = next((k for k in range(1, len(parents)) if parents[k] in parents[:k]), len(parents))
        self.chain_key = "top" if turn.policy.greedy else 0  # greedy: the chain's draft is the likeliest token too
        exit_gain = {0: [0.0], "top": [0.0]}  # the exit's g drafts: a sampled chain (0) or likeliest tokens in a tree
        for kind, gains in exit_gain.items():
            p = 1.0
            for g in range(1, min(self.gamma, turn.room) + 1):
                p *= self.chance(("exit", g, kind or self.chain_key))
                gains.append(gains[-1] + p)
        second = self.chance(self.RUNNER_UP)
        best = (1 / (self.costs[2] + extra["none"]), "none", 0, 0, 0, 0.0)  # one step
        for g, (chain, top) in enumerate(zip(exit_gain[0], exit_gain["top"])):
            for k, tree in enumerate(tree_gain):
                for wide in (0, 1) if g == 1 else (0,):  # the exit's runner-up beside its one draft
                    if g or k:
                        choice = (("path" if k <= path_k else "tree") if not g else
                                  "exit" if not (k or wide) else "exit+tree")
                        gain = tree + (top + wide * second if k or wide else chain)
                        value = (1 + gain) / (self.steps_seconds(g, k + wide) + extra[choice])
                        if value > best[0]:
                            best = (value, choice, g, k, wide, gain)
        _, choice, g, k, wide, gain = best
        self.choices[choice] += 1
        self.pending = (choice, g, k + wide, began, 1 + gain)
        self.last = None
        if choice == "none":
            return deterministic_chain(turn, [], (), "lookup", True)
        if choice == "exit":  # up to gamma drafts, each kept while its q promises more tokens per second
            self.last = ("exit", [], min(self.gamma, turn.room))
            return self.exit.propose(turn, g=self.last[2], stop=self.exit_stop(extra["exit"]))
        if choice == "path":  # a chain of deterministic drafts: judged as lookup's are (q one-hot), no tree to walk
            path = [entries[e] for e in ranked[:k]]
            self.last = ("tree", [(d, d - 1, key) for d, (_, _, key, _) in enumerate(path, 1)])
            return deterministic_chain(turn, [tok for _, tok, _, _ in path], tuple(key[0] for _, _, key, _ in path),
                                       "lookup", True)
        chosen, record = set(ranked[:k]), []

        def graft(tree: Tree) -> None:  # the exit's nodes (if any: a child's first its likeliest, then its runner-up),
            # then the chosen deterministic ones merged in
            record.extend((c, p, ("exit", tree.depth[c], "second" if r else "top"))
                          for p, kids in enumerate(tree.children) for r, c in enumerate(kids))
            node_of = {-1: 0}
            for e, (pe, tok, key, _) in enumerate(entries):  # parent-first order
                if e in chosen:
                    node_of[e] = tree.child(node_of[pe], tok, key[0])
                    record.append((node_of[e], node_of[pe], key))
        self.last = ("tree", record)
        if choice == "tree":
            tree = Tree(turn.n, turn.root, turn.last.device)
            graft(tree)
            return deterministic_tree(tree, True)
        return exit_tree_proposal(draft_tree(turn.model, turn.policy, turn.cache, turn.n, turn.last, g, 1 + wide,
                                             g + wide, 0.0, turn.timings, graft, turn.root))

    def exit_stop(self, extra: float):
        """The exit chain's stop rule, `draft`'s draft_stop(j, top): keep the (j+1)-th draft while its chance, learned
        per depth and bucket of the draft's top probability (the signal q gives before the verify), makes the cycle's
        expected tokens per second higher with it than without: (1 + E + P c_j) / s(j + 1) >= (1 + E) / s(j), with
        E the expected accepted so far, P the chance that every earlier draft is accepted, s(i) the seconds of a
        cycle of i drafts (`steps_seconds(i, 0)` + the exit cycles' `extra`). Learned per bucket in `commit`."""
        state = {"gain": 0.0, "p": 1.0}
        buckets = self.last[1]

        def seconds(i: int) -> float:
            return self.steps_seconds(i, 0) + extra

        def stop(j: int, top: float) -> bool:
            b = next(i for i, edge in enumerate(self.Q_EDGES) if top >= edge)
            p = state["p"] * self.chance(("exit", j + 1, "q", b))
            if (1 + state["gain"] + p) / seconds(j + 1) < (1 + state["gain"]) / seconds(j):
                return True
            state["gain"], state["p"] = state["gain"] + p, p
            buckets.append(b)
            return False
        return stop

    def steps_seconds(self, g: int, k: int) -> float:
        """The seconds of a cycle's steps on this machine: g exit draft steps and a verify of g + k + 1 rows."""
        return (g * self.costs[0] + self.v(g + k + 1)) * self.costs[2]

    def extra(self, choice: str) -> float:
        """What this kind of cycle took beyond its steps (the loop's Python, the lookup, the tree's tables; never less
        than nothing): the median of its latest cycles, robust to a stall of the machine; none until a few were
        timed, so that every kind is tried."""
        extra = self.overhead.get(choice, ())
        return max(0.0, statistics.median(extra)) if len(extra) >= self.OVERHEAD_CYCLES[0] else 0.0

    def v(self, k: int) -> float:
        """A k-row full step over a one-row step (measured; linear past the largest measured)."""
        v = self.costs[1]
        return v[k] if k in v else v[max(v)] * k / max(v)

    def commit(self, tokens: list, cycle=None) -> None:
        self.lookup.commit(tokens)
        for a in self.counts.values():
            a[0], a[1] = a[0] * self.DECAY, a[1] * self.DECAY
        if self.pending is not None:  # the cycle's own seconds (a host read ended it) beyond its steps'
            choice, g, k, began, promised = self.pending
            if choice == "exit" and cycle is not None:  # the chain's length was chosen while drafting
                g = cycle.nodes
            kept = self.promise.setdefault(choice, [0, 0.0, 0])
            kept[0], kept[1], kept[2] = kept[0] + 1, kept[1] + promised, kept[2] + len(tokens)
            self.overhead.setdefault(choice, collections.deque(maxlen=self.OVERHEAD_CYCLES[1])).append(
                time.perf_counter() - began - self.steps_seconds(g, k))
            self.pending = None
        if self.last is None or cycle is None:
            return
        if self.last[0] == "exit":  # depths 1..k accepted, k + 1 judged and rejected (if drafted)
            _, buckets, most = self.last
            for d in range(1, min(cycle.accepted + 1, most) + 1):  # as the plan sees it: a draft the chain stopped
                # before counts as not accepted (the chance that choosing the chain brings a d-th token)
                keys = [("exit", d, self.chain_key)] + ([("exit", d, "q", buckets[d - 1])] if d <= len(buckets) else [])
                for key in keys:
                    a = self.counts.setdefault(key, [0, 0])
                    a[0] += d <= cycle.accepted
                    a[1] += 1
            return
        on_path = set(cycle.path if cycle.path is not None else range(cycle.accepted + 1))  # a path: its first k
        for node, parent, key in self.last[1]:
            if parent in on_path:  # judged: its parent was reached
                a = self.counts.setdefault(key, [0, 0])
                a[0] += node in on_path
                a[1] += 1
                if key == self.RUNNER_UP:
                    self.runner_up[0] += 1
                    self.runner_up[1] += node in on_path

    def stats(self, cycles: list) -> dict:
        """Besides the choices made and the runner-up's tally, auto_promise: per choice, [cycles, the tokens they
        promised, the tokens they committed], the plan's expectation beside what it delivered."""
        overhead_ms = {k: 1e3 * statistics.median(o) for k, o in self.overhead.items()}
        return dict(auto_choices=dict(self.choices), nodes_per_cycle=nodes_per_cycle(cycles),
                    auto_overhead_ms=overhead_ms, auto_runner_up=list(self.runner_up),
                    auto_promise={k: list(v) for k, v in self.promise.items()}) | self.lookup.stats(cycles)


def monotone(costs: tuple) -> tuple:
    """Step costs (c, {k: v(k)}, full_s) with v made non-decreasing in k: v(k) = the least measured v(j), j >= k. A
    k-row step never costs less than a (k - 1)-row one, so a v(k) above a later v(j) is the machine's noise (one
    stalled round in a median of five), which would otherwise rule out every proposal of k - 1 drafts."""
    c, v, full_s = costs
    fixed, low = {}, math.inf
    for k in sorted(v, reverse=True):
        low = fixed[k] = min(low, v[k])
    return c, dict(sorted(fixed.items())), full_s


class Drafting(NamedTuple):
    """How each cycle drafts (speculative_generate's settings besides the policy; checked by generate.check_policy):
    the source's name `draft` (one of DRAFTS), `gamma` (the draft length, a tree's depth; with draft_stop, its cap),
    `tree_width` (candidates per expanded node; 1: a chain), `tree_nodes` (a tree's node budget; 0: width x gamma),
    `draft_stop` (stop drafting when the draft's top probability is below it; 0: off), `lookup_tokens` (the lookup's
    proposal length; 0: gamma, auto's 2 gamma: it cuts each path where it stops paying) and `ngram` (the lookup's
    longest n-gram)."""
    draft: str = "exit"
    gamma: int = 1
    tree_width: int = 1
    tree_nodes: int = 0
    draft_stop: float = 0.0
    lookup_tokens: int = 0
    ngram: int = 3


def make_source(drafting: Drafting, prompt, *, eos: frozenset = frozenset(), measure=None,
                memory: Optional[dict] = None) -> DraftSource:
    """The draft source `drafting` names, for a generation from `prompt` (its token ids, a 1-D tensor or a list).
    `memory`: what a source that learns kept from earlier generations with the same model and policy (auto)."""
    draft, gamma, tree_width, tree_nodes, draft_stop, lookup_tokens, ngram = drafting
    budget = tree_nodes or tree_width * gamma
    if draft == "auto":  # `measure(rows)`: (c, {k: v(k)}, a full step's seconds) of this machine
        return AutoDraft(prompt, gamma, tree_nodes or 8, lookup_tokens or 2 * gamma, measure, ngram, eos,
                         max(tree_width, 2), memory)
    if draft == "recycle":
        return Recycled(gamma, tree_width, budget)
    exit = ExitTree(gamma, tree_width, budget, draft_stop) if tree_width > 1 else ExitChain(gamma, draft_stop)
    if draft == "exit":
        return exit
    if draft == "lookup":  # gamma: the proposal's length; tree_width: its branches
        return PromptLookup(prompt, lookup_tokens or gamma, ngram, eos, branches=tree_width)
    return ExitAndLookup(exit, PromptLookup(prompt, lookup_tokens or gamma, ngram, eos, uses_exit=True))
