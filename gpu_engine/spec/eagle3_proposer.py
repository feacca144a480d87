"""EAGLE-3 chain drafting from the target's hidden states.

The head's KV cache entry at position t is made from (token x_{t+1}, the target's hidden states at
t): once the target has computed positions and the next token of each is known, those entries are
added (a prefill of the head), and the last one's output gives draft 1. Draft j + 1 then comes from
(draft j, the head's own previous output) one position further; those chain entries are never
kept: the next call replaces them with the target's real hidden states of the accepted tokens.
A greedy chain runs as one CUDA graph per batch size once `build_chain` has captured them
(gpu_engine/spec/chain_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gpu_engine.block_manager import hash_block
from gpu_engine.model import rope_cos_sin_cache
from gpu_engine.ops import select_ops
from gpu_engine.spec.chain_graphs import ChainGraphs
from gpu_engine.spec.draft_cache import DraftKVCache
from gpu_engine.spec.eagle3 import Eagle3Head
from gpu_engine.spec.proposer import DraftBatch, DraftRequest, Proposal, draw_drafts


@dataclass
class _Work:
    """One request's share of this call."""

    index: int
    req: DraftRequest
    first: int  # first new entry position
    count: int  # new entries
    row: int  # their first row in the target's hidden states
    drafts: int  # tokens to propose


class Eagle3Proposer:
    method = "eagle3"

    def __init__(self, head: Eagle3Head, target_embed: nn.Embedding, num_blocks: int, block_size: int,
                 max_model_len: int, device: torch.device, enable_prefix_caching: bool = True):
        self.head = head
        self.embed = head.embed_tokens if head.embed_tokens is not None else target_embed
        c = head.cfg.layer
        self.dtype = head.norm.dtype
        self.device = device
        self.vocab_size = head.cfg.vocab_size
        self.max_model_len = max_model_len
        self.ops = select_ops(device)
        self.cos_sin = rope_cos_sin_cache(c, max_model_len + 32, device)
        self.cache = DraftKVCache(num_blocks, block_size, 1, c.num_kv_heads, c.head_dim, self.dtype,
                                  device, enable_prefix_caching)
        self.chain: ChainGraphs | None = None

    def build_chain(self, max_rows: int, steps: int, capture: bool) -> float:
        """Greedy chains of `steps` drafts for up to `max_rows` sequences run as one fixed-shape
        program (captured as CUDA graphs when `capture`); returns the seconds capturing took."""
        h = self.head.cfg.layer.hidden_size
        self.chain = ChainGraphs(
            self.cache, steps, max_rows, self.max_model_len, [(h, self.dtype), (h, self.dtype)],
            greedy=lambda state: self.head.target_ids(self.head.draft_logits(state[0]).argmax(dim=-1)),
            forward=lambda tok, state, positions, meta: self._forward(tok, state[1], positions, meta))
        return self.chain.capture() if capture else 0.0

    @property
    def aux_layers(self) -> tuple[int, ...]:
        """Target layers whose entering residual stream the target must return (forward_aux)."""
        return self.head.cfg.aux_layers

    @staticmethod
    def bytes_per_block(head: Eagle3Head, block_size: int) -> int:
        c = head.cfg.layer
        return DraftKVCache.bytes_per_block(block_size, 1, c.num_kv_heads, c.head_dim, head.norm.dtype)

    def release(self, seq_id: int) -> None:
        self.cache.release(seq_id)

    @torch.inference_mode()
    def propose(self, batch: DraftBatch) -> Proposal:
        with self.cache.staging():
            return self._propose(batch)

    def _propose(self, batch: DraftBatch) -> Proposal:
        works = [w for w in (self._plan(i, r) for i, r in enumerate(batch.requests)) if w is not None]
        out: list[list[int]] = [[] for _ in batch.requests]
        if not works:
            return Proposal(out)
        works.sort(key=lambda w: w.count != 1)  # single-entry sequences first (decode kernels)
        normed, prenorm = self._prefill(works, batch.target_hidden)
        drafting = [i for i, w in enumerate(works) if w.drafts > 0]
        for w in works:
            toks = w.req.token_ids
            n = len(toks) - 1
            new_keys = list(toks[w.first + 1 : w.first + w.count + 1])
            self.cache.commit(w.req.seq_id, w.first, new_keys, final_end=n - 1, parent=self._parent(toks))
        if not drafting:
            return Proposal(out)
        ends = _last_rows(works)  # (picked on the host: a CUDA tensor indexed by a list waits for the device)
        last_rows = self.cache.upload([ends[i] for i in drafting], torch.int64)
        chain = [works[i] for i in drafting]
        if self.chain is not None and self.chain.serves(chain):
            firsts = [len(w.req.token_ids) - 1 for w in chain]  # each chain's first entry's position
            tokens = self.chain.run((normed[last_rows], prenorm[last_rows]), [w.req.seq_id for w in chain],
                                    firsts, [w.drafts for w in chain])
            probs = None
        else:
            tokens, probs = self._chain(chain, normed[last_rows], prenorm[last_rows])
        for w, toks in zip(chain, tokens):
            out[w.index] = toks[: w.drafts]
        if probs is None:
            return Proposal(out)
        order = sorted(range(len(chain)), key=lambda i: chain[i].index)  # request order
        return Proposal(out, torch.cat([probs[i][: chain[i].drafts] for i in order]))

    # -- planning -----------------------------------------------------------------------------------
    def _plan(self, index: int, req: DraftRequest) -> _Work | None:
        """New entries for a request, or None if it has none (and so cannot draft either)."""
        toks = req.token_ids
        n = len(toks) - 1  # entries exist for positions 0 .. n - 1 (position t needs x_{t+1})
        if req.hidden_rows is None or n < 1:
            return None
        row0, p0, count = req.hidden_rows
        p1 = min(p0 + count, n)
        valid = self.cache.sync(req.seq_id, toks[1:], self._parent(toks))
        if valid < p0:  # the target's hidden states of p0's predecessors are gone (a prefix hit)
            self.cache.reset(req.seq_id, start=p0)
            valid = p0
        drafts = req.num_drafts if p1 == n else 0
        if drafts and valid >= n:  # the last entry's output gives draft 1: recompute it
            if p0 > n - 1:
                return None  # no hidden state of position n - 1 was handed over
            valid = n - 1
        first, num = valid, p1 - valid
        if num <= 0:
            return None
        if not self.cache.reserve(req.seq_id, p1 + max(drafts - 1, 0)):
            self.cache.release(req.seq_id)  # out of draft blocks: no drafts for it this step
            return None
        self.cache.truncate(req.seq_id, first)
        return _Work(index, req, first, num, row0 + (first - p0), drafts)

    @staticmethod
    def _parent(tokens) -> bytes:
        """Entry t's KV depends on tokens 0 .. t + 1: chain the key hashes (tokens 1 ..) from token 0."""
        return hash_block(b"", [int(tokens[0])])

    # -- forwards -----------------------------------------------------------------------------------
    def _prefill(self, works: list[_Work], target_hidden: torch.Tensor):
        rows = self.cache.upload(np.concatenate([np.arange(w.row, w.row + w.count) for w in works]), torch.int64)
        keys = [t for w in works for t in w.req.token_ids[w.first + 1 : w.first + w.count + 1]]
        ids = self.cache.upload(keys, torch.int64)
        hidden = self.head.fc(target_hidden[rows].to(self.dtype))
        meta, positions = self.cache.metadata([(w.req.seq_id, w.first, w.count) for w in works])
        return self._forward(ids, hidden, positions, meta)

    def _forward(self, ids, hidden, positions, meta):
        embeds = self.embed(ids).to(self.dtype)
        return self.head(embeds, hidden, positions, self.cache.kv[0], meta, self.cos_sin, self.ops)

    def _chain(self, works: list[_Work], normed: torch.Tensor, prenorm: torch.Tensor):
        """k drafts per work, feeding each draft and the head's own output back."""
        up = self.cache.upload
        temps = up([w.req.temperature for w in works], torch.float32)
        keys = up([w.req.key for w in works], torch.int64)
        base = up([len(w.req.token_ids) for w in works], torch.int64)
        sampled = any(w.req.temperature > 0 for w in works)
        steps = max(w.drafts for w in works)
        tokens, probs = [], []
        for j in range(steps):
            tok, q = self._draw(normed, temps, keys, base + j, sampled)
            tokens.append(tok)
            probs.append(q)
            if j + 1 == steps:
                break
            live = [i for i, w in enumerate(works) if w.drafts > j + 1]
            entries = [(works[i].req.seq_id, len(works[i].req.token_ids) - 1 + j, 1) for i in live]
            meta, positions = self.cache.metadata(entries)
            if len(live) == len(works):  # every row goes on (batch 1 always): no gather or scatter
                normed, prenorm = self._forward(tok, prenorm, positions, meta)
                continue
            idx = up(live, torch.int64)
            n_out, p_out = self._forward(tok[idx], prenorm[idx], positions, meta)
            normed = normed.clone()
            prenorm = prenorm.clone()
            normed[idx], prenorm[idx] = n_out, p_out
        token_lists = torch.stack(tokens, dim=1).tolist()  # the step's one host sync
        if not sampled:
            return token_lists, None
        return token_lists, torch.stack(probs, dim=1)  # [S, steps, V]

    def _draw(self, normed, temps, keys, positions, sampled):
        """Draft ids -> target ids; q over the target vocabulary (0 outside the draft vocabulary)."""
        logits = self.head.draft_logits(normed)  # [S, Vd]
        ids, q = draw_drafts(logits, temps, keys, positions, sampled)
        target_ids = self.head.target_ids(ids)
        if q is None:
            return target_ids, None
        full = torch.zeros(q.shape[0], self.vocab_size, dtype=torch.float32, device=q.device)
        vocab_ids = self.head.target_ids(torch.arange(q.shape[1], device=q.device))
        full[:, vocab_ids] = q
        return target_ids, full


def _last_rows(works: list[_Work]) -> list[int]:
    """Row of each work's last new entry in the prefill's output."""
    rows, end = [], 0
    for w in works:
        end += w.count
        rows.append(end - 1)
    return rows
