"""The executor's step planner: which sequences run this step, with which tokens. No torch.

A step is `plan = scheduler.schedule()`, `runner.launch(plan)`, `scheduler.commit(plan)`, and
later `scheduler.update(plan, runner.collect(...))`. commit() advances the scheduled sequences as
if the step had run, with a placeholder for each token being sampled, so the next step can be
planned while this one is still on the GPU; update() fills the placeholders in and applies stops.
Two small policies decide: an admission policy ("may this waiting sequence join the running batch?")
and a composer ("how many tokens does each running sequence get under the step's token budget?").
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Protocol

from gpu_engine.block_manager import BlockManager, hash_token_blocks
from gpu_engine.outputs import Logprobs
from gpu_engine.sequence import Request, Sequence, SeqStatus

PENDING = -1
"""Placeholder token id: drawn by a launched step, not read back yet."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 8192
    """Token budget of one step."""
    max_num_seqs: int = 256
    """Most sequences in the running batch."""
    enable_chunked_prefill: bool = True
    """Split prompts that do not fit the step's remaining budget across steps."""
    policy: str = "max_utilization"
    """Admission: "max_utilization" or "guaranteed_no_evict" (see EngineConfig)."""
    max_prefill_tokens_per_seq: int | None = None
    """Most prompt tokens one sequence prefills per step (chunked prefill only); None: no cap."""

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        if self.max_prefill_tokens_per_seq is not None and self.max_prefill_tokens_per_seq < 1:
            raise ValueError(f"max_prefill_tokens_per_seq must be >= 1, got {self.max_prefill_tokens_per_seq}")
        if self.policy not in ADMISSION_POLICIES:
            raise ValueError(f"unknown admission policy {self.policy!r}; one of {list(ADMISSION_POLICIES)}")


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: tokens token_ids[start:start + num_tokens]."""

    seq: Sequence
    start: int
    num_tokens: int
    sample: bool
    """The chunk reaches the sequence's last token: sample the next one."""
    num_samples: int = 1
    """More than 1 when the request forks into its n samples at this step."""
    prompt_logprobs: bool = False
    """Return logprobs for every position of the chunk (prompt logprobs were asked for)."""


@dataclass
class StepPlan:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    """Decodes first, then prefill chunks."""
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    """(src, dst) block copies to run before the forward (copy-on-write of shared blocks)."""
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(e.num_tokens for e in self.scheduled)

    @property
    def num_decodes(self) -> int:
        """Leading entries that are single-token decodes."""
        n = 0
        for e in self.scheduled:
            if e.num_tokens != 1:
                break
            n += 1
        return n

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SampledToken:
    token_id: int
    logprobs: Logprobs | None = None
    """The chosen token's raw logprob and the top-N (when asked for)."""


@dataclass
class StepResult:
    samples: list[list[SampledToken]]
    """Per plan entry: its sampled tokens (empty when the entry does not sample)."""
    prompt_logprobs: dict[int, list[Logprobs]] = field(default_factory=dict)
    """Per plan entry index (prompt_logprobs entries): logprobs of token p+1 for each position p."""


class AdmissionPolicy(Protocol):
    def can_admit(self, seq: Sequence, scheduler: "Scheduler") -> bool: ...


class MaxUtilization:
    """Admit whenever blocks for the first chunk can be allocated; running out later preempts."""

    def can_admit(self, seq: Sequence, scheduler: "Scheduler") -> bool:
        return True


class GuaranteedNoEvict:
    """Admit only if prompt + max_tokens of every sample fits beside what running ones reserve."""

    def __init__(self):
        self._epoch = -1
        self._available = 0  # free blocks minus what running sequences still reserve

    def can_admit(self, seq: Sequence, scheduler: "Scheduler") -> bool:
        if self._epoch != scheduler.epoch:  # once per schedule(), not once per candidate
            self._epoch = scheduler.epoch
            reserved = sum(self.blocks_to_finish(s, scheduler.block_size) for s in scheduler.running)
            self._available = scheduler.block_manager.num_free_blocks - reserved
        needed = self.blocks_to_finish(seq, scheduler.block_size)
        if needed > self._available:
            return False
        self._available -= needed  # admitting it reserves what it needs to finish
        return True

    @staticmethod
    def blocks_to_finish(seq: Sequence, block_size: int) -> int:
        request = seq.request
        final_len = seq.num_prompt_tokens + request.max_tokens
        total_blocks = -(-final_len // block_size)
        own = max(0, total_blocks - len(seq.block_table))
        # Forked samples share the full prompt blocks and need the rest (plus one copied block).
        forks = request.pending_forks if seq.index == 0 else 0
        return own + forks * (total_blocks - seq.num_prompt_tokens // block_size)


ADMISSION_POLICIES: dict[str, type] = {
    "max_utilization": MaxUtilization,
    "guaranteed_no_evict": GuaranteedNoEvict,
}


class DecodeFirstComposer:
    """Running decodes first, then prefill chunks (chunked prefill splits a prompt across steps)."""

    def __init__(self, chunked_prefill: bool, max_prefill_tokens_per_seq: int | None = None):
        self.chunked_prefill = chunked_prefill
        self.prefill_cap = max_prefill_tokens_per_seq if chunked_prefill else None

    def order(self, running: list[Sequence]) -> list[Sequence]:
        decodes = [s for s in running if s.num_uncomputed_tokens == 1]
        prefills = [s for s in running if s.num_uncomputed_tokens > 1]
        return decodes + prefills

    def num_tokens(self, seq: Sequence, budget: int) -> int:
        if seq.num_pending and seq.num_output_tokens >= seq.request.max_tokens:
            return 0  # its last token is being drawn: it finishes when that step is collected
        n = seq.num_uncomputed_tokens
        if self.prefill_cap is not None:
            n = min(n, self.prefill_cap)
        if n <= budget:
            return n
        return budget if self.chunked_prefill else 0


class Scheduler:
    """Waiting queue, running batch, and the KV blocks each sequence holds."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.admission: AdmissionPolicy = ADMISSION_POLICIES[config.policy]()
        self.composer = DecodeFirstComposer(config.enable_chunked_prefill,
                                            config.max_prefill_tokens_per_seq)
        self.waiting: list[Sequence] = []  # sorted by Sequence.sort_key
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.epoch = 0  # counts schedule() calls
    # -- requests ---------------------------------------------------------------------------------
    def add(self, request: Request, prior_output_token_ids: list[int] | tuple[int, ...] = ()) -> Sequence:
        seq = Sequence(
            request=request,
            index=0,
            token_ids=list(request.prompt_token_ids) + list(prior_output_token_ids),
            num_prompt_tokens=len(request.prompt_token_ids),
        )
        seq.num_reported_tokens = len(prior_output_token_ids)
        request.seqs.append(seq)
        self._enqueue(seq)
        return seq

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence now (stop, length, abort): its blocks return to the pool at once."""
        if seq.is_finished:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq.block_table)
        seq.block_table = []
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    def abort(self, request: Request) -> None:
        request.aborted = True
        for seq in request.seqs:
            self.finish(seq, "abort")

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def prefill_backlog_tokens(self) -> int:
        return sum(s.num_uncomputed_tokens for s in self.waiting) + sum(
            s.num_uncomputed_tokens for s in self.running if s.num_uncomputed_tokens > 1
        )

    # -- planning ---------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        self.epoch += 1
        plan = StepPlan()
        entries: dict[int, ScheduledSeq] = {}
        budget = self.config.max_num_batched_tokens
        for seq in self.composer.order(self.running):
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = self.composer.num_tokens(seq, budget)
            if n == 0:
                continue
            while not self._grow(seq, n, plan):
                victim = max(self.running, key=lambda s: s.sort_key)
                budget += self._preempt(victim, plan, entries)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                entries[seq.seq_id] = self._entry(seq, n)
                budget -= n
        if not plan.preempted:
            budget = self._admit_waiting(budget, plan, entries)
        plan.scheduled = sorted(entries.values(), key=_decode_first)
        return plan

    def _admit_waiting(self, budget: int, plan: StepPlan, entries: dict[int, ScheduledSeq]) -> int:
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            seats = 1 + (seq.request.pending_forks if seq.index == 0 else 0)
            if len(self.running) + seats > self.config.max_num_seqs:
                break
            if not self.admission.can_admit(seq, self):
                break
            acquired = self._acquire_cached_prefix(seq)
            n = self.composer.num_tokens(seq, budget)
            if n == 0 or not self._grow(seq, n, plan):
                self.block_manager.free(acquired)
                seq.block_table, seq.num_computed_tokens, seq.num_registered_blocks = [], 0, 0
                break
            if seq.index == 0 and "first_scheduled" not in seq.request.metrics:
                seq.request.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
                seq.request.metrics["first_scheduled"] = time.monotonic()
            self.waiting.pop(0)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            entries[seq.seq_id] = self._entry(seq, n)
            budget -= n
        return budget

    def _entry(self, seq: Sequence, n: int) -> ScheduledSeq:
        start = seq.num_computed_tokens
        sample = start + n == seq.num_tokens
        request = seq.request
        forks = request.pending_forks if sample and seq.index == 0 else 0
        wants_prompt_lp = (
            request.params.prompt_logprobs is not None and seq.index == 0 and start < seq.num_prompt_tokens
        )
        return ScheduledSeq(seq, start, n, sample, 1 + forks, wants_prompt_lp)

    def _acquire_cached_prefix(self, seq: Sequence) -> list[int]:
        """Point a fresh sequence at the cached blocks of its prefix (always leaving one token
        to compute, whose logits give the next token)."""
        if seq.block_table or seq.request.params.prompt_logprobs is not None:
            return []
        self._extend_hashes(seq, (seq.num_tokens - 1) // self.block_size)
        usable = seq.block_hashes[: (seq.num_tokens - 1) // self.block_size]
        blocks = self.block_manager.acquire_prefix(usable)
        seq.block_table = list(blocks)
        seq.num_computed_tokens = len(blocks) * self.block_size
        seq.num_registered_blocks = len(blocks)
        return blocks

    def _grow(self, seq: Sequence, n: int, plan: StepPlan) -> bool:
        """Give `seq` the blocks to hold n more tokens (copying a shared block it would write
        into). False, with nothing changed, when the pool is short."""
        bs = self.block_size
        first = seq.num_computed_tokens // bs
        copy = first < len(seq.block_table) and self.block_manager.ref_count(seq.block_table[first]) > 1
        needed = -(-(seq.num_computed_tokens + n) // bs) - len(seq.block_table)
        blocks = self.block_manager.allocate(max(needed, 0) + copy)
        if blocks is None:
            return False
        if copy:
            src, dst = seq.block_table[first], blocks.pop(0)
            plan.blocks_to_copy.append((src, dst))
            self.block_manager.free([src])
            seq.block_table[first] = dst
            seq.num_registered_blocks = min(seq.num_registered_blocks, first)
        seq.block_table.extend(blocks)
        return True

    def _preempt(self, seq: Sequence, plan: StepPlan, entries: dict[int, ScheduledSeq]) -> int:
        """Free a running sequence's blocks and queue it for recompute; returns refunded budget."""
        refund = 0
        entry = entries.pop(seq.seq_id, None)
        if entry is not None:
            refund = entry.num_tokens
        owned = set(seq.block_table)
        plan.blocks_to_copy = [(s, d) for s, d in plan.blocks_to_copy if d not in owned]
        self.running.remove(seq)
        self.block_manager.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_registered_blocks = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(seq)
        plan.preempted.append(seq)
        return refund

    def _enqueue(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        keys = [s.sort_key for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, seq.sort_key), seq)

    # -- after the step ---------------------------------------------------------------------------
    def commit(self, plan: StepPlan) -> None:
        """The plan was launched: its tokens count as computed, each draw as a pending token."""
        for entry in plan.scheduled:
            seq = entry.seq
            seq.num_computed_tokens += entry.num_tokens
            if entry.sample:
                seq.token_ids.append(PENDING)
                seq.num_pending += 1

    def update(self, plan: StepPlan, result: StepResult) -> list[Sequence]:
        """Fill in the committed plan's sampled tokens and apply stops; returns the sequences that
        got new tokens (finished ones included)."""
        touched: list[Sequence] = []
        for i, entry in enumerate(plan.scheduled):
            seq = entry.seq
            if seq.is_finished:
                continue  # aborted or stopped while the step ran
            self._register_full_blocks(seq)
            if entry.prompt_logprobs:
                self._record_prompt_logprobs(entry, result.prompt_logprobs.get(i, []))
            if entry.sample:
                samples = result.samples[i]
                seqs = [seq] + [self._fork(seq, k) for k in range(1, len(samples))]
                for s, sampled in zip(seqs, samples):
                    self._append(s, sampled)
                    touched.append(s)
        return touched

    def _fork(self, parent: Sequence, index: int) -> Sequence:
        """A new sample sharing the parent's blocks; it draws its first token in the same step
        (never with async scheduling: forking steps run synchronously)."""
        child = Sequence(
            request=parent.request,
            index=index,
            token_ids=list(parent.token_ids),
            num_prompt_tokens=parent.num_prompt_tokens,
            status=SeqStatus.RUNNING,
            num_computed_tokens=parent.num_computed_tokens,
            block_table=list(parent.block_table),
            block_hashes=list(parent.block_hashes),
            num_registered_blocks=parent.num_registered_blocks,
            num_reported_tokens=parent.num_reported_tokens,
            num_pending=parent.num_pending,
        )
        self.block_manager.share(child.block_table)
        parent.request.seqs.append(child)
        self.running.append(child)
        return child

    def _append(self, seq: Sequence, sampled: SampledToken) -> None:
        """Put a sampled token in place of the sequence's oldest pending one, then apply stops."""
        token = sampled.token_id
        slot = len(seq.token_ids) - seq.num_pending
        seq.token_ids[slot] = token
        seq.num_pending -= 1
        if sampled.logprobs is not None:
            seq.logprobs.append(sampled.logprobs)
            seq.cumulative_logprob += sampled.logprobs.get(token, 0.0)
        request = seq.request
        params = request.params
        n_out = slot + 1 - seq.num_prompt_tokens
        if n_out > params.min_tokens:  # the sampler masks stop tokens until min_tokens
            if token in params.stop_token_ids:
                return self._stop(seq, "stop", token)
            if not params.ignore_eos and token in request.eos_token_ids:
                return self._stop(seq, "stop", None)
        if n_out >= request.max_tokens or slot + 1 >= request.max_model_len:
            self._stop(seq, "length")

    def _stop(self, seq: Sequence, reason: str, stop_reason: int | None = None) -> None:
        del seq.token_ids[len(seq.token_ids) - seq.num_pending :]  # drafts after the stop
        seq.num_pending = 0
        self.finish(seq, reason, stop_reason)

    def _record_prompt_logprobs(self, entry: ScheduledSeq, rows: list[Logprobs]) -> None:
        request = entry.seq.request
        if not request.prompt_logprobs:
            request.prompt_logprobs.append(None)  # nothing precedes the first token
        for j, row in enumerate(rows):
            position = entry.start + j + 1  # row j predicts the token at this position
            if position < entry.seq.num_prompt_tokens and position == len(request.prompt_logprobs):
                request.prompt_logprobs.append(row)

    def _register_full_blocks(self, seq: Sequence) -> None:
        if not self.block_manager.enable_prefix_caching:
            return
        known = min(seq.num_computed_tokens, len(seq.token_ids) - seq.num_pending)
        full = known // self.block_size
        if full <= seq.num_registered_blocks:
            return
        self._extend_hashes(seq, full)
        for b in range(seq.num_registered_blocks, full):
            self.block_manager.register(seq.block_table[b], seq.block_hashes[b])
        seq.num_registered_blocks = full

    def _extend_hashes(self, seq: Sequence, num_blocks: int) -> None:
        have = len(seq.block_hashes)
        if num_blocks > have:
            parent = seq.block_hashes[-1] if have else b""
            tokens = seq.token_ids[: num_blocks * self.block_size]
            seq.block_hashes.extend(hash_token_blocks(tokens, self.block_size, parent, have))


def _decode_first(entry: ScheduledSeq) -> int:
    return 0 if entry.num_tokens == 1 else 1
