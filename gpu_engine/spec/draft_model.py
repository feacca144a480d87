"""Draft-model proposer: a smaller checkpoint sharing the target's tokenizer proposes k tokens
autoregressively, with its own paged KV cache (its own blocks, counted in the memory budget by the
engine through `bytes_per_block`).

Its cache is kept in step lazily: at each call it keeps the longest prefix of what it computed that
still matches the sequence's tokens (the accepted drafts included), and computes the rest: the
tokens the target added (its bonus or correction token, or a whole prompt the first time), then the
drafts one position at a time (greedy chains as one CUDA graph per batch size once `build_chain`
has captured them: gpu_engine/spec/chain_graphs.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from gpu_engine.config import ModelConfig
from gpu_engine.errors import ModelLoadError
from gpu_engine.model import CausalLM, rope_cos_sin_cache
from gpu_engine.ops import select_ops
from gpu_engine.spec.chain_graphs import ChainGraphs
from gpu_engine.spec.draft_cache import DraftKVCache
from gpu_engine.spec.proposer import DraftBatch, DraftRequest, Proposal, draw_drafts


@dataclass
class _Work:
    index: int
    req: DraftRequest
    first: int  # first position to compute
    last: int  # n: the last known token's position
    drafts: int


def load_draft_model(folder: str | Path, target: ModelConfig, dtype: torch.dtype,
                     device: torch.device, dummy: bool = False) -> CausalLM:
    """The draft checkpoint in `folder`, as published: a pre-quantized one (FP8, INT4 AWQ: its
    config.json says so) is served quantized, as the target would be. `dummy`: random weights
    (seeded apart from the target's), only the folder's config.json is read."""
    from gpu_engine.quant import read_checkpoint_quant, resolve_quantization
    from gpu_engine.weights import load_model

    folder = Path(folder).expanduser()
    cfg = ModelConfig.from_folder(folder)
    if abs(cfg.vocab_size - target.vocab_size) > 1024:
        raise ModelLoadError(f"draft model {folder} has vocab_size {cfg.vocab_size}, the target "
                             f"{target.vocab_size}: a draft must share the target's tokenizer")
    quant = resolve_quantization(None, read_checkpoint_quant(folder), dummy=dummy)
    return load_model(cfg, folder, dtype, device, quant, load_format="dummy" if dummy else "auto",
                      seed=DUMMY_DRAFT_SEED, kv_fp8=False, progress=False)


DUMMY_DRAFT_SEED = 1
"""Seeds a dummy draft's weights (the target's dummy weights take the engine's seed, 0 by default),
so that a draft of the target's own shape is not the target itself."""


class DraftModelProposer:
    method = "draft_model"

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, max_model_len: int,
                 device: torch.device, target_vocab_size: int, enable_prefix_caching: bool = True):
        self.model = model
        c = model.cfg
        self.device = device
        self.ops = select_ops(device)
        self.cos_sin = rope_cos_sin_cache(c, max_model_len + 32, device)
        self.vocab_size = target_vocab_size
        self.max_model_len = max_model_len
        self.cache = DraftKVCache(num_blocks, block_size, c.num_layers, c.num_kv_heads, c.head_dim,
                                  model.norm.dtype, device, enable_prefix_caching)
        self.chain: ChainGraphs | None = None

    def build_chain(self, max_rows: int, steps: int, capture: bool) -> float:
        """Greedy chains of `steps` drafts for up to `max_rows` sequences run as one fixed-shape
        program (captured as CUDA graphs when `capture`); returns the seconds capturing took."""
        self.chain = ChainGraphs(
            self.cache, steps, max_rows, self.max_model_len, [(self.model.cfg.hidden_size, self.model.norm.dtype)],
            greedy=lambda state: self._logits(state[0]).argmax(dim=-1),
            forward=lambda tok, state, positions, meta: (
                self.model(tok, positions, self.cache.kv, meta, self.cos_sin, self.ops),))
        return self.chain.capture() if capture else 0.0

    @staticmethod
    def bytes_per_block(model: CausalLM, block_size: int) -> int:
        c = model.cfg
        return DraftKVCache.bytes_per_block(block_size, c.num_layers, c.num_kv_heads, c.head_dim,
                                            model.norm.dtype)

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
        works.sort(key=lambda w: w.last - w.first != 0)  # one-token catch-ups first (decode kernels)
        ids = [t for w in works for t in w.req.token_ids[w.first : w.last + 1]]
        meta, positions = self.cache.metadata([(w.req.seq_id, w.first, w.last + 1 - w.first) for w in works])
        hidden = self.model(self._ids(ids), positions, self.cache.kv, meta, self.cos_sin, self.ops)
        ends, end = [], 0
        for w in works:
            end += w.last + 1 - w.first
            ends.append(end - 1)
        last = hidden[self.cache.upload(ends, torch.int64)]
        if self.chain is not None and self.chain.serves(works):
            tokens, probs = self.chain.run((last,), [w.req.seq_id for w in works],
                                           [w.last + 1 for w in works], [w.drafts for w in works]), None
        else:
            tokens, probs = self._chain(works, last)
        for w, toks in zip(works, tokens):
            toks = toks[: w.drafts]
            out[w.index] = toks
            known = list(w.req.token_ids[w.first : w.last + 1])
            self.cache.commit(w.req.seq_id, w.first, known + toks[:-1], final_end=w.last)
        if probs is None:
            return Proposal(out)
        order = sorted(range(len(works)), key=lambda i: works[i].index)
        return Proposal(out, torch.cat([probs[i][: works[i].drafts] for i in order]))

    def _plan(self, index: int, req: DraftRequest) -> _Work | None:
        if req.num_drafts <= 0:
            return None  # caught up lazily, when it drafts
        toks = req.token_ids
        n = len(toks) - 1
        valid = min(self.cache.sync(req.seq_id, toks), n)  # position n's logits give draft 1
        self.cache.truncate(req.seq_id, valid)
        if not self.cache.reserve(req.seq_id, n + req.num_drafts):
            self.cache.release(req.seq_id)  # out of draft blocks: no drafts for it this step
            return None
        return _Work(index, req, valid, n, req.num_drafts)

    def _ids(self, ids: list[int]) -> torch.Tensor:
        t = self.cache.upload(ids, torch.int64)
        return t.clamp_(max=self.model.cfg.vocab_size - 1)  # ids past a smaller draft vocabulary

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[S, V] float32 over the target's vocabulary."""
        logits = self.model.compute_logits(hidden)
        v = logits.shape[1]
        if v >= self.vocab_size:
            return logits[:, : self.vocab_size]
        pad = torch.full((logits.shape[0], self.vocab_size - v), float("-inf"), device=logits.device)
        return torch.cat([logits, pad], dim=1)

    def _chain(self, works: list[_Work], hidden: torch.Tensor):
        up = self.cache.upload
        temps = up([w.req.temperature for w in works], torch.float32)
        keys = up([w.req.key for w in works], torch.int64)
        base = up([w.last + 1 for w in works], torch.int64)
        sampled = any(w.req.temperature > 0 for w in works)
        steps = max(w.drafts for w in works)
        tokens, probs = [], []
        for j in range(steps):
            tok, q = draw_drafts(self._logits(hidden), temps, keys, base + j, sampled)
            tokens.append(tok)
            probs.append(q)
            if j + 1 == steps:
                break
            live = [i for i, w in enumerate(works) if w.drafts > j + 1]
            meta, positions = self.cache.metadata([(works[i].req.seq_id, works[i].last + 1 + j, 1) for i in live])
            if len(live) == len(works):  # every row goes on (batch 1 always): no gather or scatter
                hidden = self.model(tok, positions, self.cache.kv, meta, self.cos_sin, self.ops)
                continue
            idx = up(live, torch.int64)
            out = self.model(tok[idx], positions, self.cache.kv, meta, self.cos_sin, self.ops)
            hidden = hidden.clone()
            hidden[idx] = out
        token_lists = torch.stack(tokens, dim=1).tolist()  # the step's one host sync
        return token_lists, (torch.stack(probs, dim=1) if sampled else None)
