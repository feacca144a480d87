"""N-gram prompt lookup: exact proposals on constructed sequences."""

from __future__ import annotations

import numpy as np
import pytest

from gpu_engine.spec.ngram import NgramProposer, ngram_lookup
from gpu_engine.spec.proposer import DraftBatch, DraftRequest


def look(tokens, k=3, lo=1, hi=3):
    return ngram_lookup(np.asarray(tokens, dtype=np.int64), k, lo, hi)


def test_continues_the_longest_suffix_match():
    #        0  1  2  3  4  5  6  7  8  9  10 11
    seq = [5, 1, 2, 3, 9, 8, 2, 3, 7, 1, 2, 3]
    # suffix 3-gram [1, 2, 3] occurs at 1..3 -> continuation [9, 8, 2]; the 2-gram [2, 3] also
    # occurs later (6..7 -> 7) but the longer match wins
    assert look(seq) == [9, 8, 2]
    assert look(seq, hi=2) == [7, 1, 2]  # longest allowed is 2: most recent [2, 3] is at 6..7


def test_most_recent_occurrence_wins_and_k_caps_the_proposal():
    seq = [4, 7, 1, 4, 7, 2, 4, 7]
    assert look(seq, k=5, lo=2, hi=2) == [2, 4, 7]  # [4, 7] at 3..4 is more recent than 0..1
    assert look(seq, k=1, lo=2, hi=2) == [2]
    assert look(seq, k=5, lo=1, hi=1) == [2, 4, 7]


def test_no_match_below_the_minimum():
    assert look([1, 2, 3, 4, 5], lo=1) == []
    assert look([1, 2, 9, 1, 2], lo=3, hi=4) == []  # only a 2-gram recurs
    assert look([1, 2, 9, 1, 2], lo=2, hi=4) == [9, 1, 2]
    assert look([3], lo=1) == []
    assert look([1, 2, 1, 2], k=0) == []


def test_the_continuation_may_run_into_the_suffix_itself():
    # periodic text: [1, 2] at 2..3 matches the suffix; what follows it overlaps the suffix
    assert look([1, 2, 1, 2, 1, 2], k=4, lo=2, hi=3) == [1, 2]
    assert look([7, 7, 7, 7], k=3, lo=1, hi=3) == [7]


def test_batched_proposer_and_bounds():
    p = NgramProposer(2, 3)
    batch = DraftBatch([DraftRequest(0, [1, 2, 3, 1, 2], 2), DraftRequest(1, [5, 6], 2),
                        DraftRequest(2, [8, 9, 8, 9], 0)])
    assert p.propose(batch).token_ids == [[3, 1], [], []]
    p.release(0)
    with pytest.raises(ValueError, match="prompt_lookup_min <= prompt_lookup_max"):
        NgramProposer(4, 2)


def test_matches_a_brute_force_search():
    rng = np.random.default_rng(0)
    for _ in range(300):
        tokens = rng.integers(0, 4, size=int(rng.integers(1, 40)))
        lo, hi, k = int(rng.integers(1, 3)), int(rng.integers(3, 6)), int(rng.integers(1, 6))
        assert ngram_lookup(tokens, k, lo, hi) == _brute(tokens.tolist(), k, lo, hi)


def _brute(t, k, lo, hi):
    n_len = len(t)
    for n in range(min(hi, n_len - 1), lo - 1, -1):
        suffix = t[n_len - n:]
        for start in range(n_len - n - 1, -1, -1):
            if t[start:start + n] == suffix:
                return t[start + n:start + n + k]
    return []


def test_the_proposer_keeps_each_sequence_as_an_array_and_follows_changes():
    """Grown a token or several at a time, cut short, or changed at its end: each proposal equals
    the stateless lookup over the tokens given."""
    rng = np.random.default_rng(1)
    p = NgramProposer(1, 4)
    seqs = {0: [], 1: []}
    for step in range(400):
        for seq_id, tokens in seqs.items():
            if step % 97 == 96:
                del tokens[len(tokens) // 2:]  # shorter (a stop cut the output)
            elif step % 89 == 88 and tokens:
                tokens[-1] = int(rng.integers(0, 5))  # its last token replaced
            tokens.extend(int(t) for t in rng.integers(0, 5, size=int(rng.integers(1, 4))))
            got = p.propose(DraftBatch([DraftRequest(seq_id, tokens, 3)])).token_ids[0]
            assert got == _brute(tokens, 3, 1, 4), (step, seq_id)
    p.release(0)
    assert list(p._known) == [1]
