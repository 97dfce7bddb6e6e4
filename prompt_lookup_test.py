"""Prompt lookup's index (prompt_lookup.py): the incremental index proposes what a brute-force scan finds, by the
written rule (the longest n-gram first, then its latest occurrence). The loop's use of it: generate_test.py."""
import torch

from prompt_lookup import Lookup, scan_branches, scan_proposal


def test_lookup_index_equals_a_brute_force_scan_on_random_streams():
    g = torch.Generator().manual_seed(0)
    proposed = several = matches = 0
    for trial in range(60):
        vocab, ngram = (2, 3, 5, 20)[trial % 4], 1 + trial % 4
        stream = torch.randint(0, vocab, (120,), generator=g).tolist()
        lookup = Lookup(stream[:3], ngram)
        pos = 3
        while pos < len(stream):
            for k in (1, 3, 7):
                want = scan_proposal(stream[:pos], k, ngram)
                assert lookup.propose(k) == want, (trial, pos, k)
                proposed += bool(want)
                branches = scan_branches(stream[:pos], k, 3, ngram)
                assert lookup.branches(k, 3) == branches, (trial, pos, k)
                assert branches[:1] == ([want] if want else [])  # the first branch is propose's
                several += len(branches) > 1
            text = stream[:pos]  # the longest n-gram ending the text that occurred before, followed by a token
            longest = next((n for n in range(min(ngram, pos), 0, -1)
                            if any(text[e - n + 1:e + 1] == text[pos - n:] for e in range(pos - 2, n - 2, -1))), 0)
            assert lookup.longest_match() == longest, (trial, pos)
            matches += longest > 1
            step = 1 + int(torch.randint(0, 4, (1,), generator=g))  # cycles commit 1..4 tokens
            lookup.add(stream[pos:pos + step])
            pos += step
    assert proposed > 500 and several > 200 and matches > 100


def test_lookup_branches_newest_then_most_frequent():
    # "5" was followed by 7 (twice), 8 (once, the latest) and 9 (once): 8 first, then 7, then 9
    tokens = [5, 7, 1, 5, 9, 2, 5, 7, 3, 5, 8, 4, 5]
    assert scan_branches(tokens, 1, 3, ngram=1) == [[8], [7], [9]]
    assert Lookup(tokens, 1).branches(1, 2) == [[8], [7]]
    assert Lookup(tokens, 1).branches(2, 4) == [[8, 4], [7, 3], [9, 2], [7, 1]]  # continuations differ past the first


def test_lookup_rule_longest_ngram_then_latest_occurrence():
    # "5 6" occurred twice, followed by 7 then by 9: the latest wins; the 3-gram "4 5 6" occurred once, followed by 7
    assert scan_proposal([5, 6, 7, 5, 6, 9, 5, 6], 2) == [9, 5]
    assert scan_proposal([4, 5, 6, 7, 1, 5, 6, 9, 4, 5, 6], 2) == [7, 1]
    assert scan_proposal([1, 2, 3], 4) == []  # nothing repeats
    assert scan_proposal([1, 1], 4) == [1]  # the continuation is cut where the text ends
    lookup = Lookup([4, 5, 6, 7, 1, 5, 6, 9, 4, 5, 6], ngram=3)
    assert lookup.propose(2) == [7, 1] and Lookup([4, 5, 6, 7, 1, 5, 6, 9, 4, 5, 6], 2).propose(2) == [9, 4]
