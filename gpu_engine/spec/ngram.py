"""N-gram proposer (prompt lookup): continue the longest recent match of the sequence's last tokens.

For each sequence, the last n tokens (n from prompt_lookup_max down to prompt_lookup_min) are
looked up earlier in its own tokens; the most recent occurrence of the longest matching n-gram
wins and the tokens that followed it are the drafts. No model, no state.
"""

from __future__ import annotations

import numpy as np

from gpu_engine.spec.proposer import DraftBatch, Proposal


def ngram_lookup(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens following the most recent earlier occurrence of the longest suffix n-gram
    (n_min <= n <= n_max) of `tokens` [L] int64; [] when no suffix of n_min tokens recurs."""
    length = tokens.shape[0]
    if k <= 0 or length < n_min + 1:
        return []
    n_max = min(n_max, length - 1)
    # ends e = 1 .. L-1: match[j, e-1] is True when tokens[e-1-j] == tokens[L-1-j]
    ends = np.arange(1, length)
    run = np.ones(length - 1, dtype=bool)
    match_len = np.zeros(length - 1, dtype=np.int64)
    for j in range(n_max):
        idx = ends - 1 - j
        ok = idx >= 0
        same = np.zeros(length - 1, dtype=bool)
        same[ok] = tokens[idx[ok]] == tokens[length - 1 - j]
        run &= same
        match_len += run
        if not run.any():
            break
    best = int(match_len.max())
    if best < n_min:
        return []
    end = int(np.flatnonzero(match_len == best)[-1]) + 1  # most recent, e <= L - 1
    return tokens[end : end + k].tolist()


class NgramProposer:
    """Prompt lookup over each sequence's own tokens (vLLM's "ngram" method)."""

    method = "ngram"

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int):
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{prompt_lookup_min} and {prompt_lookup_max}")
        self.n_min = prompt_lookup_min
        self.n_max = prompt_lookup_max

    def propose(self, batch: DraftBatch) -> Proposal:
        out = []
        for r in batch.requests:
            tokens = np.asarray(r.token_ids, dtype=np.int64)
            out.append(ngram_lookup(tokens, r.num_drafts, self.n_min, self.n_max))
        return Proposal(out)

    def release(self, seq_id: int) -> None:
        """Nothing kept per sequence."""
