"""Self-speculative decoding: the KV-cached draft / verify loop on one shared model (batch size 1, as in gpt-fast).

    cache holds positions [0, n) in every layer; `last` is the newest committed token, not yet in the cache
    draft:   feed last, d1, .., d(g-1) through the shared layers + exit, one token at a time -> q1..qg, d1..dg
             feed dg through the shared layers too (its layer-L state is all verification still needs)
             (with draft_stop P: stop at the first q_j whose top probability is below P; g = j - 1 drafts)
    verify:  the remaining layers on the g+1 saved layer-L states at positions n..n+g   -> p1..p(g+1)
    accept:  k drafts by the speculative-sampling rule, then one token from the target (correction or bonus)
    commit:  crop every layer back to n+k+1 positions; last = the target's token

No layer ever recomputes a position, and after each cycle the cache holds exactly the committed tokens.

Reading order: `speculative_generate` (the loop: each cycle asks its draft source for a Proposal, `run_cycle`
verifies it in one pass and `judge`s it, chains and trees alike, then commits and tells the source), drafts.py (the
sources: the exit's chain and `draft`, its tree and `draft_tree`, prompt lookup, both), then sampling.py (the policy
and the acceptance rules, on the device). A cycle reads back from the device once (a tree: once per level and once
for its walk), so a GPU runs ahead of Python (host_reads.py). The model is anything with the `Steps` methods
(truncated_llama's TruncatedLlama); this module needs neither the sweep (evaluate.py) nor the trainer (train.py).
"""
import statistics
import time
import weakref
from typing import NamedTuple, Optional, Protocol

import torch

from cli import check_context, device_sync, lap
from decode_engine import TreeRows
from drafts import DRAFTS, Drafting, Proposal, Turn, make_source
from host_reads import to_device
from results import cycle_stats, judged_drafts  # noqa: F401 (judged_drafts: part of the loop's API)
from sampling import Policy, accept_tree, check_sampling, judge_chain, read_chain, sample  # noqa: F401 (sample: API)


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

    def full_step(self, input_ids: torch.Tensor, cache: Cache, start: int, *, with_exit: bool = False,
                  logits: bool = True) -> Optional[torch.Tensor]: ...


# ----------------------------------------------------------------------------------------------------------------
# The values the loop accepts (the policy and the rules themselves: sampling.py)

SWEEP_FLAGS = {"gamma": "--gammas", "temperature": "--temperatures", "top_p": "--top_p", "top_k": "--top_k",
               "draft_stop": "--draft_stop", "tree_width": "--tree_widths", "tree_nodes": "--tree_nodes",
               "draft": "--drafts", "lookup_tokens": "--lookup_tokens", "ngram": "--ngram"}


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
    if not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"{flags['gamma']}: gamma (the draft length) must be an integer >= 1, got {gamma}.")
    check_sampling(temperature=temperature, top_p=top_p, top_k=top_k, flags=flags)
    if not (isinstance(draft_stop, (int, float)) and 0 <= draft_stop < 1):
        raise ValueError(f"{flags.get('draft_stop', '--draft_stop')}: draft_stop must be in [0, 1) (0 turns it off), "
                         f"got {draft_stop}.")
    if not isinstance(tree_width, int) or isinstance(tree_width, bool) or tree_width < 1:
        raise ValueError(f"{flags.get('tree_width', '--tree_widths')}: tree_width (candidates per expanded node) must "
                         f"be an integer >= 1 (1: a chain), got {tree_width}.")
    if not isinstance(tree_nodes, int) or isinstance(tree_nodes, bool) or tree_nodes < 0:
        raise ValueError(f"{flags.get('tree_nodes', '--tree_nodes')}: tree_nodes (drafted nodes per cycle) must be an "
                         f"integer >= 0 (0: tree_width x gamma), got {tree_nodes}.")


def plan(*, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, **drafting) -> dict:
    """Flat settings, named as the sweep's cells and flags name them (Drafting's fields and the policy's), as
    speculative_generate's `drafting` and `policy`: speculative_generate(model, ids, n, **plan(gamma=4, top_p=0.9))."""
    return {"drafting": Drafting(**drafting), "policy": Policy(temperature, top_p, top_k)}


# ----------------------------------------------------------------------------------------------------------------
# The loops


@torch.inference_mode()
def speculative_generate(model: Steps, input_ids: torch.Tensor, max_new_tokens: int, drafting: Drafting = Drafting(),
                         policy: Optional[Policy] = None, *, eos_token_id: Optional[int | list[int]] = None,
                         generator: Optional[torch.Generator] = None, timings: Optional[dict] = None) -> tuple:
    """Self-speculative decoding with `model` (a Steps: truncated_llama's TruncatedLlama). Returns (new tokens, stats).

    Lossless: greedy returns exactly the autoregressive tokens; sampling returns exactly the target's distribution
    under the policy (temperature, then top-k, then top-p, applied alike to target p and draft q). A draft token x is
    accepted with probability min(1, p(x)/q(x)); the first rejection samples from normalise(max(0, p - q)); when all
    are accepted a bonus token is sampled from the next p. Greedy accepts while the draft equals argmax p.

    `drafting` (drafts.Drafting) names the draft source and its sizes; `policy` (sampling.Policy) is greedy unless
    given; `plan(...)` makes both from flat settings. Draft sources (`draft`): "exit" (the early exit drafts gamma
    tokens, one at a time, or a tree of depth gamma), "lookup" (prompt lookup, `Lookup`: up to `lookup_tokens` tokens,
    0 meaning gamma, copied from where the newest `ngram`..1 tokens occurred before in prompt + reply; a proposal is
    deterministic, q one-hot, so x is accepted with probability p(x); no match: the cycle is one plain step;
    tree_width B > 1: the matched n-gram's B distinct continuations as one tree), "exit+lookup" (a chain: the lookup's
    proposal when it has one, else the exit's chain; a tree, tree_width > 1: the exit's tree with the lookup's
    proposal grafted on as one more path, duplicates merged, all verified in one pass), "recycle" (a tree of depth
    gamma, tree_width children a node, from the target's own top next tokens of earlier verify passes for each token
    id; no model call), "auto" (each cycle: a tree of lookup's continuations and recycled predictions, the exit's
    chain, the exit's likeliest tokens with that tree in one, or nothing, by the expected tokens per second of this
    machine: its measured step costs, `step_costs`, and each kind of cycle's measured extra time; drafts.AutoDraft).

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
    check_policy(**drafting._asdict())
    _check_prompt(model, input_ids, max_new_tokens)
    policy = policy if policy is not None else Policy()
    eos = frozenset(_as_set(eos_token_id)) if eos_token_id is not None else frozenset()
    t0 = time.perf_counter()
    source = make_source(drafting, input_ids[0], eos=eos, measure=lambda rows: step_costs(model, input_ids, rows),
                         memory=learned(model, drafting, policy))
    cache, n, last = _prefill(model, input_ids, with_exit=source.uses_exit, room=max_new_tokens,
                              drafts=source.max_rows + 1, observe=source.observe if source.observes else None)
    root = int(last)  # the newest token's id, kept on the host from here (a tree's root)
    cycles, tokens, sources = [], [], []
    # summed on the device in float64 (the same sums as Python floats), read once at the end: no sync per cycle
    overlap_sum = torch.zeros((), dtype=torch.float64, device=input_ids.device)
    done = False
    while not done and len(tokens) < max_new_tokens:
        turn = Turn(model, policy, cache, n, last, root, max_new_tokens - len(tokens) - 1, generator, timings)
        cycle = run_cycle(turn, source.propose(turn), source.observe if source.observes else None)
        cycles.append(cycle)
        overlap_sum += cycle.overlap
        k = cycle.accepted
        committed = cycle.drafts[:k] + [cycle.token]
        for i, t in enumerate(committed):
            tokens.append(t)
            sources.append(cycle.sources[i] if i < k else None)
            if t in eos:
                done = True
                break
        if cycle.path is not None:  # a tree: the accepted path's keys and values move to n.., the rest goes
            t1 = lap(timings, None, input_ids.device)
            cache.keep(n, [n + i for i in cycle.path])
            lap(timings, "cache moves", input_ids.device, t1)
        n += k + 1
        cache.crop(n)  # rejected drafts' positions go
        root, last = cycle.token, to_device([[cycle.token]], input_ids.device)  # pinned on a GPU: no wait
        source.commit(committed, cycle)
    stats = loop_stats(cycles, sources, overlap_sum.item(), max(drafting.gamma, source.depth), source, cache,
                       model.num_layers)
    return _finish(tokens, stats, t0, input_ids.device)


def loop_stats(cycles: list, sources: list, overlap_sum: float, depth: int, source, cache, num_layers: int) -> dict:
    """speculative_generate's stats (see there) from its cycle records and each new token's source."""
    per_cycle = [c.accepted for c in cycles]
    stats = cycle_stats(per_cycle, [c.nodes for c in cycles], overlap_sum, max([depth] + per_cycle),
                        [c.accepted + c.rejected for c in cycles], sum(c.overlap_rows for c in cycles))
    stats.update(from_draft=[s is not None for s in sources], token_sources=sources,
                 cycle_kinds=[c.kind for c in cycles],
                 source_counts={s: sum(x == s for x in sources) for s in ("exit", "lookup", "both", "recycled")}
                 | {"target": sum(x is None for x in sources)},
                 lookup_matched=[], lookup_match_rate=None, lookup_seconds=0.0,
                 cache_positions=[cache.length(i) for i in range(num_layers)])
    return stats | source.stats(cycles)


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


def run_cycle(turn: Turn, proposal: Proposal, observe=None) -> Cycle:
    """Verify a proposal in one pass and judge it: one Cycle. The cache then holds positions up to n + the drafts
    written; the caller keeps what it commits. `observe(inputs, logits)`: given every verified row's input token and
    the target's logits there (a source that learns from them: drafts.Recycled)."""
    device = turn.last.device
    t0 = lap(turn.timings, None, device)
    p_logits = verify(turn, proposal)
    if observe is not None:
        tree = proposal.tree
        observe(tree.walk[1] if tree is not None else torch.cat([turn.last.view(1), proposal.tokens]), p_logits)
    t0 = lap(turn.timings, "verify", device, t0)
    cycle = judge(turn.policy, proposal, p_logits, turn.generator)
    lap(turn.timings, "accept", device, t0)
    return cycle


def verify(turn: Turn, proposal: Proposal) -> torch.Tensor:
    """The target's logits at `last` and at every drafted token (a tree's nodes), in one call: the remaining layers on
    the drafts' layer-L states, or every layer on the tokens when no draft step ran (a deterministic proposal)."""
    tree = {} if proposal.tree is None else {"tree": proposal.tree.verify_rows}
    if proposal.hidden is None and proposal.tree is not None:  # a deterministic tree: every layer on its nodes
        h, _ = turn.model.extend(proposal.tree.walk[1].view(1, -1), turn.cache, turn.n, with_exit=proposal.with_exit,
                                 **tree)
        return turn.model.verify(h, turn.cache, turn.n, **tree)[0]
    if proposal.hidden is None:
        ids = torch.cat([turn.last.view(1), proposal.tokens]).view(1, -1)
        return turn.model.full_step(ids, turn.cache, turn.n, with_exit=proposal.with_exit)[0]
    return turn.model.verify(torch.cat(proposal.hidden, dim=1), turn.cache, turn.n, **tree)[0]


def judge(policy: Policy, proposal: Proposal, p_logits: torch.Tensor,
          generator: Optional[torch.Generator] = None) -> Cycle:
    """The exact acceptance rule on a verified proposal, on the device, then the cycle's host read: a chain by
    sampling.judge_chain (a deterministic chain's q one-hot at each token x: x is accepted with probability
    min(1, p(x) / 1) = p(x) and a rejection samples from normalise(max(0, p - onehot(x))) = p without x), a tree by
    sampling.accept_tree (several candidates a node). The overlap stat: sum_x min(p, q) over the drafted positions
    (a tree: its expanded nodes the walk reached; a deterministic token: p(x))."""
    tree = proposal.tree
    if tree is not None:
        path, token, rejected, p_at = accept_tree(policy, tree, p_logits, generator)
        # the overlap stat needs the walk's path, known after its read: on a GPU its softmaxes would sit in the queue
        # before the next cycle's copies, so there it is left out (a tree's avg_overlap: CPU only)
        seen = [u for u in path if u in proposal.q_logits] if p_logits.device.type == "cpu" else []
        overlap = (sum(torch.minimum(p_at(u), policy.probs(proposal.q_logits[u])).sum() for u in seen)
                   if seen else 0.0)
        return Cycle([tree.tokens[i] for i in path[1:]], len(path) - 1, token, overlap, len(seen), rejected,
                     len(tree.tokens) - 1, path, proposal.level_rows, tuple(tree.source[i] for i in path[1:]), "tree")
    p = policy.probs(p_logits)
    drafts, q, overlap = proposal.tokens, proposal.q, 0.0
    d = drafts.shape[0]
    if d and q is None:
        rows = torch.arange(d, device=p.device)
        q = torch.zeros(d, p.shape[-1], dtype=p.dtype, device=p.device)
        q[rows, drafts] = 1.0
        overlap = p[rows, drafts].double().sum()
    elif d:
        overlap = torch.minimum(p[:d], q).sum()
    drafts, k, token = read_chain(drafts, *judge_chain(policy, p_logits, p, q, drafts, generator))
    return Cycle(drafts, k, token, overlap, d, int(k < d), d, sources=proposal.sources, kind=proposal.kind)


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


def _prefill(model, input_ids, with_exit, room=0, drafts=0, observe=None):
    """All prompt tokens but the last go into every layer's cache; the last one is fed by the first step.
    `room`: positions the generation will add, `drafts`: how many more a cycle may write (the lean engine reserves
    them up front). The capacity is prompt + room + a multiple of SLACK, so that autoregressive and speculative
    decoding of one prompt get the same capacity, the span every attention call reads (decode_engine.StaticCache)."""
    cache = model.new_cache(input_ids.shape[1] + room + SLACK * (drafts // SLACK + 1))
    if input_ids.shape[1] > 1:  # logits only for a source that learns from them (the rest would drop them)
        logits = model.full_step(input_ids[:, :-1], cache, 0, with_exit=with_exit, logits=observe is not None)
        if observe is not None:  # the prompt's tokens and the target's logits after each
            observe(input_ids[0, :-1], logits[0])
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

COSTS = weakref.WeakKeyDictionary()  # model -> (c, {k: v(k)}, seconds of a full step): measured once per model


def step_costs(model: Steps, input_ids: torch.Tensor, rows: int) -> tuple:
    """(c, {k: v(k) for k = 1..rows}, full_s) for `model` on this machine: a draft step over a one-token full step,
    a k-token full step over a one-token one, and the one-token step's seconds; measured once per model (step_times,
    5 rounds, on the prompt repeated to `rows` tokens), or as `remember_costs` was told (its users extrapolate past
    the largest k)."""
    if model not in COSTS:
        ids = input_ids.repeat(1, -(-(rows + 1) // input_ids.shape[1]))[:, : max(rows + 1, input_ids.shape[1])]
        remember_costs(model, *step_times(model, ids, range(2, rows + 1), repeats=5)[:3])
    return COSTS[model]


LEARNED = weakref.WeakKeyDictionary()  # model -> {(drafting, policy): what auto learned}: kept across generations


def learned(model: Steps, drafting: Drafting, policy: Policy) -> dict:
    """What --drafts auto learned in this process's earlier generations with this model, drafting and policy
    (acceptance counts, each kind of cycle's overhead), handed to the next one: a 64-token reply has too few cycles
    to learn every estimate from its prior. Exact all the same: it holds earlier generations' outcomes only."""
    return LEARNED.setdefault(model, {}).setdefault((drafting, policy.greedy, policy.temperature, policy.top_p,
                                                     policy.top_k), {})


def remember_costs(model: Steps, draft_s: float, full_s: float, verify_s: dict) -> None:
    """Step times measured elsewhere (evaluate.py times every model it sweeps; step_times' first three values)."""
    COSTS[model] = (draft_s / full_s, {1: 1.0, **{k: t / full_s for k, t in verify_s.items()}}, full_s)


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
