"""Prompt lookup's index: the draft source that costs nothing (no model call), proposing text that already occurred
(prompt + reply). drafts.PromptLookup proposes it, generate.py's loop verifies it; this module is plain Python on token ids."""


class Lookup:
    """Prompt lookup over the text so far (prompt + committed tokens): find the longest n-gram, n = ngram..1, that
    ends the text and occurred before, and propose the tokens that followed it.

    Several earlier occurrences: the latest one wins (the nearest text is the likeliest to be repeated; a model
    quoting its prompt moves forward through it). An occurrence counts only when at least one token follows it; the
    proposal is the next k tokens after it, fewer where the text ends first.

    The index maps each n-gram (n <= ngram) to the positions just after its occurrences, and is updated as tokens are
    added (`add`: O(ngram) per token), so a cycle's lookup costs O(ngram) dictionary probes, never a scan of the
    context. `scan_proposal` is the brute-force rule it must equal (tested on random token streams). `branches`: the
    several distinct continuations of that n-gram, for a tree (`scan_branches`)."""

    def __init__(self, tokens: list, ngram: int = 3):
        self.ngram, self.tokens = ngram, []
        self.index = [dict() for _ in range(ngram + 1)]  # index[n]: n-gram -> positions after its occurrences
        self.add(tokens)

    def add(self, tokens: list) -> None:
        t = self.tokens
        for tok in tokens:
            t.append(int(tok))
            i = len(t) - 1  # the new token follows the n-grams that end at i - 1
            for n in range(1, min(self.ngram, i) + 1):
                self.index[n].setdefault(tuple(t[i - n:i]), []).append(i)

    def propose(self, k: int) -> list:
        """Up to k tokens (none when no n-gram ending the text occurred before)."""
        t = self.tokens
        for n in range(min(self.ngram, len(t)), 0, -1):
            after = self.index[n].get(tuple(t[len(t) - n:]))
            if after is not None:
                return t[after[-1]:after[-1] + k]
        return []

    def longest_match(self) -> int:
        """The length of the longest n-gram (n <= ngram) that ends the text and occurred before (0: none): the
        match `propose` and `branches` follow, a signal of how likely their proposals are."""
        t = self.tokens
        return next((n for n in range(min(self.ngram, len(t)), 0, -1) if tuple(t[len(t) - n:]) in self.index[n]), 0)

    def branches(self, k: int, b: int) -> list:
        """Up to b distinct continuations of up to k tokens after the longest n-gram that ends the text and occurred
        before: the latest occurrence's first (`propose`'s), then the others, most frequent first (ties: the newer),
        from its last BRANCH_SCAN occurrences. `scan_branches` is the brute-force rule."""
        t = self.tokens
        for n in range(min(self.ngram, len(t)), 0, -1):
            after = self.index[n].get(tuple(t[len(t) - n:]))
            if after is not None:
                return ranked_continuations([t[a:a + k] for a in reversed(after[-BRANCH_SCAN:])], b)
        return []


BRANCH_SCAN = 64  # occurrences a branch lookup looks at (the newest): a frequent unigram occurs thousands of times


def ranked_continuations(newest_first: list, b: int) -> list:
    """The newest continuation, then the other distinct ones by how often they occur (ties: the newer), b at most."""
    counts, order = {}, {}
    for i, c in enumerate(map(tuple, newest_first)):
        counts[c] = counts.get(c, 0) + 1
        order.setdefault(c, i)
    first = tuple(newest_first[0])
    rest = sorted((c for c in counts if c != first), key=lambda c: (-counts[c], order[c]))
    return [list(c) for c in [first, *rest][:b]]


def scan_proposal(tokens: list, k: int, ngram: int = 3) -> list:
    """Lookup's rule by a plain scan of the whole text: the reference that `Lookup` is tested against."""
    m = len(tokens)
    for n in range(min(ngram, m), 0, -1):
        suffix = tokens[m - n:]
        for end in range(m - 2, n - 2, -1):  # the latest occurrence first; end + 1 <= m - 1 must exist
            if tokens[end - n + 1:end + 1] == suffix:
                return tokens[end + 1:end + 1 + k]
    return []


def scan_branches(tokens: list, k: int, b: int, ngram: int = 3) -> list:
    """`Lookup.branches`' rule by a plain scan: the reference it is tested against."""
    m = len(tokens)
    for n in range(min(ngram, m), 0, -1):
        suffix = tokens[m - n:]
        ends = [end for end in range(m - 2, n - 2, -1) if tokens[end - n + 1:end + 1] == suffix]
        if ends:
            return ranked_continuations([tokens[end + 1:end + 1 + k] for end in ends[:BRANCH_SCAN]], b)
    return []
