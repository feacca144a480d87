"""Speculative decoding inside the engine's step loop, engine side: after a step's tokens are in,
the proposer drafts up to k tokens for every running decode, and the scheduler plans each of them
next step as a verify entry of 1 + k tokens (gpu_engine/scheduler.py), which the runner verifies
with the rejection sampler (gpu_engine/spec/verify.py).

Drafting needs the accepted tokens on the host, so a step that may verify drafts, or draft after
it, runs synchronously (no host/device overlap). A draft model or an EAGLE-3 head drafts at every
step, so with them every step is synchronous while speculation is on. N-gram lookup finds drafts
only where the tokens repeat: between such stretches the loop overlaps, and at each overlapped
step the proposer looks up the tokens the host already has (one step behind); a match there
makes the next step synchronous, so that it drafts (`sync_next`). Above
`disable_above_batch_size` running sequences, and at batch sizes where the gate
(gpu_engine/spec/gate.py) measured speculating steps to emit fewer tokens per second than plain
ones, nothing is drafted and the overlapped loop resumes.
"""

from __future__ import annotations

import logging

from gpu_engine.sampler import row_key
from gpu_engine.spec.config import SpeculativeConfig
from gpu_engine.spec.gate import SpecGate
from gpu_engine.spec.proposer import DraftBatch, DraftRequest, Proposer

log = logging.getLogger(__name__)


class SpecDecoder:
    """A proposer and the rule for when and how much it drafts."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer):
        self.config = config
        self.proposer = proposer
        self.gate = SpecGate() if config.disable_when_slower else None
        self.sync_next = True
        """Whether the next step must run synchronously to draft (see the module's docstring)."""
        log.info("speculative decoding: %s, %d tokens per step; steps run synchronously (no host/device "
                 "overlap) while at most %d sequences run, above that nothing is drafted%s",
                 config.method, config.num_speculative_tokens, config.disable_above_batch_size,
                 "; nor where speculating measures slower" if self.gate else "")

    def active(self, num_running: int) -> bool:
        """Whether a step with this many running sequences speculates."""
        if not 0 < num_running <= self.config.disable_above_batch_size:
            return False
        return self.gate is None or self.gate.speculate(num_running)

    def observe(self, plan, speculated: bool, tokens: int, seconds: float) -> None:
        """A collected step's figures, for the gate: only decode steps (no prefill chunk) count."""
        if self.gate is None or not all(e.is_verify or e.num_tokens == 1 for e in plan.entries):
            return
        num_seqs = plan.num_plain_decodes + len(plan.entries)
        if num_seqs <= self.config.disable_above_batch_size:
            self.gate.observe(num_seqs, speculated, tokens, seconds)

    @property
    def needs_hidden(self) -> bool:
        """EAGLE-3 drafts from the target's residual streams of every step (StepResult.aux_hidden)."""
        return self.config.method == "eagle3"

    def propose(self, scheduler, plan=None, result=None) -> int:
        """Drafts for every running decode whose tokens are all known (the scheduler verifies them
        next step), from the step (plan, result) just collected. Returns the number of sequences
        given drafts."""
        if not self.active(len(scheduler.running)):
            return 0  # (checked first: a large batch pays nothing per step)
        running = list(scheduler.running)
        rows, hidden = {}, None
        if self.needs_hidden and result is not None and result.aux_hidden is not None:
            rows, hidden = _hidden_rows(plan, result), result.aux_hidden
        lookahead = getattr(self.proposer, "lookahead", None)
        self.sync_next = lookahead is None  # drafters that draft every step need every step synchronous
        seqs, requests = [], []
        for seq in running:
            k = self._num_drafts(seq)
            if not k and not self.sync_next and self._drafts_later(seq):
                self.sync_next = lookahead(seq.seq_id, seq.token_ids, seq.num_tokens - seq.num_pending)
            span = rows.get(seq.seq_id)
            if (span is None) if self.needs_hidden else k == 0:
                continue  # EAGLE-3 brings its cache in step even where it drafts nothing
            request = seq.request
            seqs.append(seq)
            requests.append(DraftRequest(seq.seq_id, seq.token_ids, k, request.params.temperature,
                                         row_key(request.seed, seq.index), span))
        if not requests:
            return 0
        proposal = self.proposer.propose(DraftBatch(requests, hidden))
        given, row = 0, 0
        for seq, request, drafts in zip(seqs, requests, proposal.token_ids):
            probs = None
            if proposal.draft_probs is not None:
                probs = proposal.draft_probs[row : row + len(drafts)]
            row += len(drafts)
            if drafts and request.num_drafts:
                scheduler.set_drafts(seq, drafts, probs)
                given += 1
        return given

    def _num_drafts(self, seq) -> int:
        """How many tokens to draft for a sequence: 0 unless it decodes next with every token
        known; never more than fit before max_tokens (a verify emits up to k + 1)."""
        if seq.num_uncomputed_tokens != 1 or seq.num_pending:
            return 0  # a prefill chunk, or a token not read back (overlapped step)
        return max(0, min(self.config.num_speculative_tokens, _room(seq)))

    def _drafts_later(self, seq) -> bool:
        """Whether a decoding sequence would be given drafts once its pending tokens are read back
        (an overlapped step: it decodes, and max_tokens leaves room)."""
        return bool(seq.num_pending) and seq.num_uncomputed_tokens <= 1 and _room(seq) > 0

    def release(self, seq_id: int) -> None:
        self.proposer.release(seq_id)


def _room(seq) -> int:
    """Drafts that fit before max_tokens (a verify emits up to k + 1 tokens)."""
    return seq.num_prompt_tokens + seq.request.max_tokens - seq.num_tokens - 1


def _hidden_rows(plan, result) -> dict[int, tuple[int, int, int]]:
    """seq_id -> (first row in result.aux_hidden, first position, count) of the positions whose
    residual streams the step computed and whose next token is known (a verify entry: the last
    token and the accepted drafts only)."""
    rows = {s.seq_id: (i, p, 1) for i, (s, p) in enumerate(zip(plan.decode_seqs, plan.decode_positions.tolist()))}
    r = len(plan.decode_seqs)
    for i, e in enumerate(plan.entries):
        count = len(result.verified[i]) if e.is_verify else e.num_tokens
        for seq in (e.seq, *e.forks):  # forks share their parent's prompt rows
            rows[seq.seq_id] = (r, e.start, count)
        r += e.num_tokens
    return rows


def load_drafter(config: SpeculativeConfig, target_config, dtype, device, dummy: bool = False):
    """The draft model or EAGLE-3 head of `config` (None for n-gram), loaded before the KV cache
    is sized so that its weights count in the memory budget. `dummy` (the engine's load_format
    "dummy"): random weights made on the device, the drafter's folder needs only its config.json."""
    if config.method == "draft_model":
        from gpu_engine.spec.draft_model import load_draft_model

        return load_draft_model(config.model, target_config, dtype, device, dummy=dummy)
    if config.method == "eagle3":
        from gpu_engine.spec.eagle3 import load_eagle3_head

        return load_eagle3_head(config.model, target_config, dtype, device, dummy=dummy)
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
