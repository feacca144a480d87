"""N-gram proposer (prompt lookup): continue the longest recent match of the sequence's last tokens.

For each sequence, the last n tokens (n from prompt_lookup_max down to prompt_lookup_min) are
looked up earlier in its own tokens; the most recent occurrence of the longest matching n-gram
wins and the tokens that followed it are the drafts. No model; the only state is a copy of each
sequence's tokens as an array, so that a step copies only its new tokens.
"""

from __future__ import annotations

import numpy as np

from gpu_engine.spec.proposer import DraftBatch, Proposal


def ngram_lookup(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens following the most recent earlier occurrence of the longest suffix n-gram
    (n_min <= n <= n_max) of `tokens` [L] int64; [] when no suffix of n_min tokens recurs.

    One comparison over the sequence finds the ends e (1 <= e <= L - 1) where tokens[e - 1] is the
    last token; each further suffix token keeps only the ends that still match, so the work after
    that first pass is the number of candidates, not the length."""
    length = tokens.shape[0]
    if k <= 0 or length < n_min + 1:
        return []
    n_max = min(n_max, length - 1)
    ends = np.flatnonzero(tokens[: length - 1] == tokens[length - 1]) + 1
    best, best_ends = (1, ends) if len(ends) else (0, ends)
    for j in range(1, n_max):
        ends = ends[ends > j]  # tokens[e - 1 - j] exists
        ends = ends[tokens[ends - 1 - j] == tokens[length - 1 - j]]
        if not len(ends):
            break
        best, best_ends = j + 1, ends
    if best < n_min:
        return []
    end = int(best_ends[-1])  # the most recent
    return tokens[end : end + k].tolist()


class _Known:
    """A sequence's known tokens as a growing int64 array (appended to, not rebuilt, each step)."""

    def __init__(self) -> None:
        self.buf = np.empty(256, dtype=np.int64)
        self.n = 0

    def sync(self, token_ids, length: int | None = None) -> np.ndarray:
        """The array of `token_ids[:length]` (default all): only the tokens beyond what it holds are
        copied, unless the sequence is shorter or its last held token changed (then it is copied whole)."""
        length = len(token_ids) if length is None else length
        n = self.n
        if length < n or (n and token_ids[n - 1] != self.buf[n - 1]):
            n = 0
        if length > self.buf.shape[0]:
            grown = np.empty(max(length, 2 * self.buf.shape[0]), dtype=np.int64)
            grown[:n] = self.buf[:n]
            self.buf = grown
        if length > n:
            self.buf[n:length] = token_ids[n:length]
        self.n = length
        return self.buf[:length]


class NgramProposer:
    """Prompt lookup over each sequence's own tokens (vLLM's "ngram" method). Each sequence's
    tokens are kept as an array between calls (released with the sequence)."""

    method = "ngram"

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int):
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{prompt_lookup_min} and {prompt_lookup_max}")
        self.n_min = prompt_lookup_min
        self.n_max = prompt_lookup_max
        self._known: dict[int, _Known] = {}

    def propose(self, batch: DraftBatch) -> Proposal:
        out = []
        for r in batch.requests:
            known = self._known.get(r.seq_id)
            if known is None:
                known = self._known[r.seq_id] = _Known()
            out.append(ngram_lookup(known.sync(r.token_ids), r.num_drafts, self.n_min, self.n_max))
        return Proposal(out)

    def lookahead(self, seq_id: int, token_ids, length: int) -> bool:
        """Whether the first `length` of a sequence's tokens (those known on the host while later
        ones are still being computed) end in an n-gram that recurs: then the sequence is likely to
        get drafts once it is in step, and the engine runs the next step synchronously."""
        known = self._known.get(seq_id)
        if known is None:
            known = self._known[seq_id] = _Known()
        return bool(ngram_lookup(known.sync(token_ids, length), 1, self.n_min, self.n_max))

    def release(self, seq_id: int) -> None:
        self._known.pop(seq_id, None)
