"""The executor's step planner: which sequences run this step, with which tokens. No torch.

A step is `plan = scheduler.schedule()`, `runner.launch(plan)`, `scheduler.commit(plan)`, and
later `scheduler.update(plan, runner.collect(...))`. commit() advances the scheduled sequences as
if the step had run, with a placeholder for each token being sampled, so the next step can be
planned while this one is still on the GPU; update() fills the placeholders in and applies stops.
Two small policies decide (scheduling_policies.py): admission and composition.

Running sequences own rows of a BatchState (numpy). Plain decodes (the bulk of a large batch) are
planned, committed and updated with array operations; only what is due for one of them gets Python
work: a new block every block_size tokens, a full block to register, a stop, a report.
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from gpu_engine.batch_decodes import plan_plain_decodes, update_plain_decodes
from gpu_engine.batch_state import BatchState, RunningSeqs
from gpu_engine.block_manager import BlockManager, hash_token_blocks
from gpu_engine.outputs import Logprobs
from gpu_engine.sampling_params import OutputKind
from gpu_engine.scheduling_policies import ADMISSION_POLICIES, AdmissionPolicy, DecodeFirstComposer
from gpu_engine.sequence import Request, Sequence, SeqStatus
from gpu_engine.spec.entries import append_verified, take_drafts, verify_entry
from gpu_engine.spec.stats import SpecDecodeStats
from gpu_engine.step_plan import PENDING, SampledToken, ScheduledSeq, StepPlan, StepResult

__all__ = ["PENDING", "SampledToken", "ScheduledSeq", "Scheduler", "SchedulerConfig", "StepPlan", "StepResult"]


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 8192
    """Token budget of one step."""
    max_num_seqs: int = 256
    """Most sequences in the running batch (the batch's slot count)."""
    enable_chunked_prefill: bool = True
    """Split prompts that do not fit the step's remaining budget across steps."""
    policy: str = "max_utilization"
    """Admission: "max_utilization" or "guaranteed_no_evict" (see EngineConfig)."""
    max_prefill_tokens_per_seq: int | None = None
    """Most prompt tokens one sequence prefills per step (chunked prefill only); None: no cap."""
    tail_overcommit: float = 0.0
    """guaranteed_no_evict: the share of the pool the waiting queue's tail may take beyond the
    reservations (see GuaranteedNoEvict); 0: none."""

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive")
        if self.max_prefill_tokens_per_seq is not None and self.max_prefill_tokens_per_seq < 1:
            raise ValueError(f"max_prefill_tokens_per_seq must be >= 1, got {self.max_prefill_tokens_per_seq}")
        if self.policy not in ADMISSION_POLICIES:
            raise ValueError(f"unknown admission policy {self.policy!r}; one of {list(ADMISSION_POLICIES)}")
        if not 0.0 <= self.tail_overcommit <= 1.0:
            raise ValueError(f"tail_overcommit must be in [0, 1], got {self.tail_overcommit}")


class Scheduler:
    """Waiting queue, running batch, and the KV blocks each sequence holds."""

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.block_size = block_manager.block_size
        self.admission: AdmissionPolicy = ADMISSION_POLICIES[config.policy]()
        self.composer = DecodeFirstComposer(config.enable_chunked_prefill,
                                            config.max_prefill_tokens_per_seq)
        self.batch = BatchState(config.max_num_seqs, self.block_size)
        self.waiting: list[Sequence] = []  # sorted by Sequence.sort_key
        self.running = RunningSeqs(self.batch)
        self.num_preemptions = 0
        self.spec_stats = SpecDecodeStats()
        self.epoch = 0  # counts schedule() calls
        self._stop_id_set: set[int] = set()
        self._stop_ids = np.zeros(0, dtype=np.int64)  # every eos / stop token id of admitted requests

    # -- requests ---------------------------------------------------------------------------------
    def add(self, request: Request, prior_output_token_ids: list[int] | tuple[int, ...] = ()) -> Sequence:
        seq = Sequence(request, 0, list(request.prompt_token_ids) + list(prior_output_token_ids),
                       len(request.prompt_token_ids), num_reported_tokens=len(prior_output_token_ids))
        request.seqs.append(seq)
        ids = set(request.eos_token_ids) | set(request.params.stop_token_ids)
        if not ids <= self._stop_id_set:
            self._stop_id_set |= ids
            self._stop_ids = np.array(sorted(self._stop_id_set), dtype=np.int64)
        self._enqueue(seq)
        return seq

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence now (stop, length, abort): its blocks return to the pool at once."""
        if seq.is_finished:
            return
        take_drafts(self, seq)
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq.block_table)
        seq.block_table = []
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    def stop_string(self, seq: Sequence, stop: str, end: int) -> None:
        """A stop string ended at the token before position `end`: the sequence finishes there,
        and tokens a verify step emitted after it are dropped (with their logprobs)."""
        known = len(seq.token_ids) - seq.num_pending
        dropped = seq.token_ids[end:known]
        if dropped:
            if seq.request.params.logprobs is not None:
                for token, lp in zip(dropped, seq.logprobs[len(seq.logprobs) - len(dropped):]):
                    seq.cumulative_logprob -= lp.get(token, 0.0)
                del seq.logprobs[len(seq.logprobs) - len(dropped):]
            del seq.token_ids[end:known]
            self.batch.tokens_changed(seq)
        self.finish(seq, "stop", stop)

    def abort(self, request: Request) -> None:
        request.aborted = True
        for seq in request.seqs:
            self.finish(seq, "abort")

    def limit_running(self, max_num_seqs: int) -> None:
        """Cap the running batch below its slot count (a sweep over batch sizes in one process)."""
        if not 1 <= max_num_seqs <= self.batch.capacity:
            raise ValueError(f"max_num_seqs must be in [1, {self.batch.capacity}] (the batch's slots), "
                             f"got {max_num_seqs}")
        self.config = dataclasses.replace(self.config, max_num_seqs=max_num_seqs)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def prefill_backlog_tokens(self) -> int:
        return sum(s.num_uncomputed_tokens for s in self.waiting) + self.batch.running_prefill_tokens()

    # -- planning ---------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        self.epoch += 1
        plan = StepPlan()
        entries: dict[int, ScheduledSeq] = {}
        budget = self.config.max_num_batched_tokens
        others = plan_plain_decodes(self, plan, budget)
        if others is None:  # a tight budget or pool: every sequence one by one, preempting as needed
            others = self.composer.order(self.running)
        budget -= len(plan.decode_seqs)
        budget = self._schedule_running(others, budget, plan, entries)
        if not plan.preempted:
            budget = self._admit_waiting(budget, plan, entries)
        plan.entries = sorted(entries.values(), key=_decode_first)
        for entry in plan.entries:  # the other samples of a prompt fork as it finishes
            if entry.num_samples > 1:
                entry.forks = [self._fork(entry.seq, k) for k in range(1, entry.num_samples)]
        plan.table_writes, plan.slot_events = self.batch.take_changes()
        return plan

    def _schedule_running(self, seqs: list[Sequence], budget: int, plan: StepPlan,
                          entries: dict[int, ScheduledSeq]) -> int:
        for seq in seqs:
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = self.composer.num_tokens(seq, budget)
            if n == 0:
                continue
            verify = verify_entry(self, seq, n, budget, plan)
            if verify is not None:
                entries[seq.seq_id] = verify
                budget -= verify.num_tokens
                continue
            while not self._grow(seq, n, plan):
                victim = max(self.running, key=lambda s: s.sort_key)
                budget += self._preempt(victim, plan, entries)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                entries[seq.seq_id] = self._entry(seq, n)
                budget -= n
        return budget

    # -- speculative decoding ---------------------------------------------------------------------
    def set_drafts(self, seq: Sequence, token_ids: list[int], probs=None) -> None:
        """Drafts for a running sequence's next step (probs: [k, vocab] tensor or None for point
        masses); the next schedule() verifies them in a 1 + k token entry."""
        if seq.status is not SeqStatus.RUNNING or seq.num_uncomputed_tokens != 1 or seq.num_pending:
            raise ValueError(f"sequence {seq.seq_id} is not a decode with every token known: no drafts")
        seq.draft_token_ids = list(token_ids)
        seq.draft_probs = probs if token_ids else None
        if seq.slot >= 0:
            self.batch.drafting[seq.slot] = bool(token_ids)

    def _admit_waiting(self, budget: int, plan: StepPlan, entries: dict[int, ScheduledSeq]) -> int:
        reserved = self._fork_seats()  # samples still to fork from running prompts
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            forks = seq.request.pending_forks if seq.index == 0 else 0
            if len(self.running) + reserved + 1 + forks > self.config.max_num_seqs:
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
            reserved += forks
        return budget

    def _fork_seats(self) -> int:
        b = self.batch
        order = b.order()
        return sum(s.request.pending_forks for s in b.seqs[order[b.special[order]]].tolist() if s.index == 0)

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
        computed = seq.num_computed_tokens
        first = computed // bs
        table = seq.block_table
        copy = first < len(table) and self.block_manager.ref_count(table[first]) > 1
        needed = -(-(computed + n) // bs) - len(table)
        if needed <= 0 and not copy:
            return True
        blocks = self.block_manager.allocate(max(needed, 0) + copy)
        if blocks is None:
            return False
        first_new = len(table)
        if copy:
            src, dst = table[first], blocks.pop(0)
            plan.blocks_to_copy.append((src, dst))
            self.block_manager.free([src])
            table[first] = dst
            seq.num_registered_blocks = min(seq.num_registered_blocks, first)
            first_new = first
        table.extend(blocks)
        self.batch.blocks_appended(seq, first_new)
        return True

    def _preempt(self, seq: Sequence, plan: StepPlan, entries: dict[int, ScheduledSeq]) -> int:
        """Free a running sequence's blocks and queue it for recompute; returns refunded budget."""
        refund = 0
        entry = entries.pop(seq.seq_id, None)
        if entry is not None:
            refund = entry.num_tokens
        elif plan.drop_decode(seq):
            refund = 1
        take_drafts(self, seq)
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
        self.waiting.insert(bisect.bisect(self.waiting, seq.sort_key, key=_sort_key), seq)

    # -- after the step ---------------------------------------------------------------------------
    def commit(self, plan: StepPlan) -> None:
        """The plan was launched: its tokens count as computed, each draw as a pending token."""
        if plan.decode_seqs:
            b, slots = self.batch, plan.decode_slots
            b.num_computed[slots] += 1
            b.num_tokens[slots] += 1
            b.num_pending[slots] += 1
            for tokens in b.token_lists[slots].tolist():
                tokens.append(PENDING)
        for entry in plan.entries:
            for seq in [entry.seq, *entry.forks]:  # a verify entry's drafts count once accepted
                seq.num_computed_tokens += entry.num_tokens - len(entry.draft_token_ids)
                if entry.sample:
                    seq.token_ids.append(PENDING)
                    seq.num_pending += 1
                    self.batch.tokens_changed(seq)

    def update(self, plan: StepPlan, result: StepResult) -> list[Sequence]:
        """Fill in the committed plan's sampled tokens and apply stops. Returns the sequences the
        engine must look at: those that finished, and those reported every step (streamed
        output, stop strings); a FINAL_ONLY sequence that merely grew is not among them."""
        if result.token_ids is None:
            pairs = zip(plan.scheduled, result.samples)
            return self._update_entries(pairs, result.prompt_logprobs, 0)
        touched = update_plain_decodes(self, plan, result)
        rows = result.token_ids.tolist()
        r = len(plan.decode_seqs)
        pairs = []
        for i, entry in enumerate(plan.entries):
            if entry.is_verify:
                pairs.append((entry, result.verified[i]))
                continue
            k = entry.num_samples if entry.sample else 0
            pairs.append((entry, [SampledToken(t, result.logprobs.get(r + j)) for j, t in enumerate(rows[r:r + k])]))
            r += k
        return touched + self._update_entries(pairs, result.prompt_logprobs, len(plan.decode_seqs))

    def _update_entries(self, pairs, prompt_logprobs: dict[int, list[Logprobs]], offset: int) -> list[Sequence]:
        """Entry by entry: the general path (forks, prompt logprobs, prefill chunks)."""
        touched: list[Sequence] = []
        for i, (entry, samples) in enumerate(pairs):
            seq = entry.seq
            if seq.is_finished:
                continue  # aborted or stopped while the step ran
            if entry.is_verify:
                append_verified(self, entry, samples)
                if self._due(seq):
                    touched.append(seq)
                continue
            self._register_full_blocks(seq)
            if entry.prompt_logprobs:
                self._record_prompt_logprobs(entry, prompt_logprobs.get(offset + i, []))
            if entry.sample:
                for s, sampled in zip([seq, *entry.forks], samples, strict=True):
                    if s.is_finished:
                        continue
                    self._append(s, sampled)
                    if self._due(s):
                        touched.append(s)
        return touched

    def _due(self, seq: Sequence) -> bool:
        request = seq.request
        if "first_token" not in request.metrics:
            request.metrics["first_token"] = time.monotonic()
            if seq.slot >= 0:
                self.batch.awaiting_first[seq.slot] = False
        if seq.is_finished:
            return True
        if seq.slot >= 0:
            return bool(self.batch.watch[seq.slot])
        return request.params.output_kind is not OutputKind.FINAL_ONLY or bool(request.params.stop)

    def _fork(self, parent: Sequence, index: int) -> Sequence:
        """A new sample sharing the parent's blocks, made as the parent's last prompt chunk is
        planned: it draws its first token in that step, from the parent's last row, in its own
        slot (so the step needs nothing from the host)."""
        child = Sequence(
            parent.request, index, list(parent.token_ids), parent.num_prompt_tokens,
            status=SeqStatus.RUNNING, num_computed_tokens=parent.num_computed_tokens,
            block_table=list(parent.block_table), block_hashes=list(parent.block_hashes),
            num_registered_blocks=parent.num_registered_blocks,
            num_reported_tokens=parent.num_reported_tokens, num_pending=parent.num_pending,
        )
        self.block_manager.share(child.block_table)
        parent.request.seqs.append(child)
        self.running.append(child)
        for s in (parent, child):
            if s.slot >= 0:
                self.batch.maybe_shared[s.slot] = True
        if parent.slot >= 0 and parent.request.pending_forks == 0:
            self.batch.special[parent.slot] = parent.request.params.prompt_logprobs is not None
        return child

    def _append(self, seq: Sequence, sampled: SampledToken) -> None:
        """Put a sampled token in place of the sequence's oldest pending one, then apply stops."""
        token = sampled.token_id
        slot = len(seq.token_ids) - seq.num_pending
        seq.token_ids[slot] = token
        seq.num_pending -= 1
        if sampled.logprobs is not None:
            self._record_logprobs(seq, token, sampled.logprobs)
        self._apply_stops(seq, token, slot)

    @staticmethod
    def _record_logprobs(seq: Sequence, token: int, logprobs: Logprobs) -> None:
        seq.logprobs.append(logprobs)
        seq.cumulative_logprob += logprobs.get(token, 0.0)

    def _apply_stops(self, seq: Sequence, token: int, position: int) -> None:
        """Stop rules for the token just placed at `position`."""
        request = seq.request
        params = request.params
        n_out = position + 1 - seq.num_prompt_tokens
        if n_out > params.min_tokens:  # the sampler masks stop tokens until min_tokens
            if token in params.stop_token_ids:
                return self._stop(seq, "stop", token)
            if not params.ignore_eos and token in request.eos_token_ids:
                return self._stop(seq, "stop", None)
        if n_out >= request.max_tokens or position + 1 >= request.max_model_len:
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
            tokens = seq.token_ids[have * self.block_size : num_blocks * self.block_size]  # the new blocks only
            seq.block_hashes.extend(hash_token_blocks(tokens, self.block_size, parent))


def _decode_first(entry: ScheduledSeq) -> int:
    return 0 if entry.num_tokens == 1 else 1


def _sort_key(seq: Sequence) -> tuple[int, int, int]:
    return seq.sort_key
