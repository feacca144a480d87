"""Speculative decoding inside the engine's step loop, engine side: after a step's tokens are in,
the proposer drafts up to k tokens for every running decode, and the scheduler plans each of them
next step as a verify entry of 1 + k tokens (gpu_engine/scheduler.py), which the runner verifies
with the rejection sampler (gpu_engine/spec/verify.py).

Drafting needs the accepted tokens on the host, so while speculation is on the engine runs its
steps synchronously (no host/device overlap); above `disable_above_batch_size` running sequences
nothing is drafted and the overlapped loop resumes.
"""

from __future__ import annotations

import logging

from gpu_engine.sampler import row_key
from gpu_engine.spec.config import SpeculativeConfig
from gpu_engine.spec.proposer import DraftBatch, DraftRequest, Proposer

log = logging.getLogger(__name__)


class SpecDecoder:
    """A proposer and the rule for when and how much it drafts."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer):
        self.config = config
        self.proposer = proposer
        log.info("speculative decoding: %s, %d tokens per step; steps run synchronously (no host/device "
                 "overlap) while at most %d sequences run, above that nothing is drafted",
                 config.method, config.num_speculative_tokens, config.disable_above_batch_size)

    def active(self, num_running: int) -> bool:
        """Whether a step with this many running sequences speculates."""
        return 0 < num_running <= self.config.disable_above_batch_size

    def propose(self, scheduler) -> int:
        """Drafts for every running decode whose tokens are all known (the scheduler verifies them
        next step). Returns the number of sequences given drafts."""
        running = list(scheduler.running)
        if not self.active(len(running)):
            return 0
        seqs, requests = [], []
        for seq in running:
            if seq.num_uncomputed_tokens != 1 or seq.num_pending:
                continue  # a prefill chunk, or a token not read back (overlapped step)
            request = seq.request
            room = seq.num_prompt_tokens + request.max_tokens - seq.num_tokens - 1  # k + 1 tokens fit
            k = min(self.config.num_speculative_tokens, room)
            if k <= 0:
                continue
            seqs.append(seq)
            requests.append(DraftRequest(seq.seq_id, seq.token_ids, k, request.params.temperature,
                                         row_key(request.seed, seq.index)))
        if not requests:
            return 0
        proposal = self.proposer.propose(DraftBatch(requests))
        given, row = 0, 0
        for seq, drafts in zip(seqs, proposal.token_ids):
            probs = None
            if proposal.draft_probs is not None:
                probs = proposal.draft_probs[row : row + len(drafts)]
            row += len(drafts)
            if drafts:
                scheduler.set_drafts(seq, drafts, probs)
                given += 1
        return given

    def release(self, seq_id: int) -> None:
        self.proposer.release(seq_id)


def load_drafter(config: SpeculativeConfig, target_config, dtype, device):
    """The draft model or EAGLE-3 head of `config` (None for n-gram), loaded before the KV cache
    is sized so that its weights count in the memory budget."""
    if config.method == "draft_model":
        from gpu_engine.spec.draft_model import load_draft_model

        return load_draft_model(config.model, target_config, dtype, device)
    if config.method == "eagle3":
        from gpu_engine.spec.eagle3 import load_eagle3_head

        return load_eagle3_head(config.model, target_config, dtype, device)
    return None


def drafter_bytes_per_block(config: SpeculativeConfig, drafter, block_size: int) -> int:
    """Bytes of one block of the drafter's own KV cache (0 for n-gram)."""
    if config.method == "draft_model":
        from gpu_engine.spec.draft_model import DraftModelProposer

        return DraftModelProposer.bytes_per_block(drafter, block_size)
    if config.method == "eagle3":
        from gpu_engine.spec.eagle3_proposer import Eagle3Proposer

        return Eagle3Proposer.bytes_per_block(drafter, block_size)
    return 0


def make_proposer(config: SpeculativeConfig, drafter, *, target_model, num_blocks: int, block_size: int,
                  max_model_len: int, device, enable_prefix_caching: bool) -> Proposer:
    """The proposer of `config`; a drafter's own cache gets `num_blocks` blocks (as many tokens as
    the target's)."""
    if config.method == "ngram":
        from gpu_engine.spec.ngram import NgramProposer

        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    if config.method == "draft_model":
        from gpu_engine.spec.draft_model import DraftModelProposer

        return DraftModelProposer(drafter, num_blocks, block_size, max_model_len, device,
                                  target_model.cfg.vocab_size, enable_prefix_caching)
    from gpu_engine.spec.eagle3_proposer import Eagle3Proposer

    return Eagle3Proposer(drafter, target_model.embed_tokens, num_blocks, block_size, max_model_len, device,
                          enable_prefix_caching)
