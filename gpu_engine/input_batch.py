"""The persistent batch, runner side: per-slot state on the device and the host, and a step's
inputs built from it with a few array operations and one upload per dtype.

On the device: each slot's block table (updated only where the scheduler wrote new blocks), its
last sampled token (read as the next step's input, so a decode's token never round-trips through
the host), and its sampling state in a slot-based `Sampler` (parameters, output position, output
counts for penalties), set once when a sequence takes the slot and advanced on the device by each
draw. A step's token rows carry (slot, position, host token or -1); the device
turns them into input ids, KV slots and block tables (gathers), so building a step costs numpy
work over arrays, and Python work only for prefill chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gpu_engine.ops import AttentionMetadata
from gpu_engine.sampler import Sampler, row_key
from gpu_engine.sequence import Sequence
from gpu_engine.step_plan import PENDING, StepPlan


@dataclass
class StepLayout:
    """A step's rows as host arrays (tokens in plan order: plain decodes, then entries)."""

    tok_slot: np.ndarray  # [T] int64: the slot each token belongs to
    tok_pos: np.ndarray  # [T] int64: its position
    host_ids: np.ndarray  # [T] int64: its id, or -1 where the device holds it (sampled last step)
    seq_slot: np.ndarray  # [S] int64: slot of each scheduled sequence
    query_start_loc: np.ndarray  # [S + 1] int32
    seq_lens: np.ndarray  # [S] int32: context length including this step's tokens
    num_decodes: int  # leading single-token sequences
    sample_rows: np.ndarray  # [R] int64: token rows to sample from (a forking prompt's last row repeated)
    sample_slot: np.ndarray  # [R] int64: the slot each sample is drawn for (each slot once)
    prompt_rows: dict[int, tuple[int, int]]  # index into plan.scheduled -> (first row, count)
    unsampled_slots: np.ndarray  # [U] int64: entries that drew nothing (their next input is on the host)
    verify: list[tuple[int, int]]  # (index into plan.entries, first token row) of each verify entry
    rows_decodable: bool = False  # every sequence is a decode or a verify entry (see decode_rows)

    @property
    def num_tokens(self) -> int:
        return len(self.tok_slot)

    @property
    def decode_rows(self) -> bool:
        """The step can run as decode rows (the decode graphs' layout): each token row attends to
        its slot's positions up to its own, so a verify entry's 1 + k rows see the KV its earlier
        rows write in the same layer, exactly as the prefill path computes them. True for plain
        decodes and verify entries; prompt chunks stay on the prefill path (a long chunk as rows
        would read its context once per token)."""
        return self.rows_decodable and not self.prompt_rows

    @property
    def rows_are_samples(self) -> bool:
        """Every token row is sampled once, in order, for its own slot (a decode-only step)."""
        return len(self.sample_rows) == self.num_tokens == self.num_decodes


class InputBatch:
    """Per-slot device buffers and sampling state, mirrored from the scheduler's BatchState."""

    def __init__(self, capacity: int, max_blocks: int, block_size: int, vocab_size: int, device: torch.device):
        self.capacity = capacity
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.device = device
        self.block_table = torch.zeros(capacity, max_blocks, dtype=torch.int32, device=device)
        self.last_token = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.dev_token = np.zeros(capacity, dtype=bool)  # last_token holds the slot's next input
        self.sampler = Sampler(capacity, vocab_size, device)
        self.seqs: list[Sequence | None] = [None] * capacity
        self.logprobs = np.full(capacity, -1, dtype=np.int64)  # top-N asked for, -1: none

    # -- mirror the scheduler's changes -----------------------------------------------------------
    def apply(self, plan: StepPlan, upload) -> None:
        """Slot events (the sampler's slots set or cleared, in order); new block-table entries
        (one upload, one scatter)."""
        for slot, seq in plan.slot_events:
            if seq is None:
                self._release(slot)
            else:
                self._occupy(slot, seq)
        slots, cols, blocks = plan.table_writes
        if len(slots):
            if int(cols.max()) >= self.block_table.shape[1]:
                raise ValueError(f"a block table needs {int(cols.max()) + 1} entries, the batch holds "
                                 f"{self.block_table.shape[1]} (max_model_len / block_size)")
            w = upload(np.stack([slots, cols, blocks]))
            self.block_table[w[0], w[1]] = w[2].to(torch.int32)

    def _occupy(self, slot: int, seq: Sequence) -> None:
        """A sequence takes the slot: its sampling state starts at its output so far (nothing, a
        resumed request's prior tokens, or what it had before a preemption)."""
        request = seq.request
        if seq.num_pending:
            raise RuntimeError(f"sequence {seq.seq_id} took slot {slot} with {seq.num_pending} tokens not read back")
        self.seqs[slot] = seq
        self.dev_token[slot] = False
        self.logprobs[slot] = -1 if request.params.logprobs is None else request.params.logprobs
        self.sampler.set_slot(slot, request.params, row_key(request.seed, seq.index), request.prompt_token_ids,
                              seq.output_token_ids, request.eos_token_ids)

    def _release(self, slot: int) -> None:
        if self.seqs[slot] is not None:
            self.seqs[slot] = None
            self.dev_token[slot] = False
            self.sampler.clear_slot(slot)

    # -- a step's rows ----------------------------------------------------------------------------
    def layout(self, plan: StepPlan) -> StepLayout:
        d = len(plan.decode_seqs)
        d_slot, d_pos = plan.decode_slots, plan.decode_positions
        d_host = np.full(d, -1, dtype=np.int64)
        for i in np.flatnonzero(~self.dev_token[d_slot]).tolist():
            d_host[i] = self._host_token(plan.decode_seqs[i], int(d_pos[i]))
        e_slot, e_start, e_n, ids, samples = [], [], [], [], []
        prompt_rows: dict[int, tuple[int, int]] = {}
        verify: list[tuple[int, int]] = []
        row = d
        for i, entry in enumerate(plan.entries):
            seq, start, n = entry.seq, entry.start, entry.num_tokens
            chunk = seq.token_ids[start : start + n]
            if entry.is_verify:  # the last token, then the drafts (all on the host)
                chunk = [self._host_token(seq, start)] + entry.draft_token_ids
                verify.append((i, row))
            elif PENDING in chunk:
                chunk = [self._device_token(seq, start, n)]
            e_slot.append(seq.slot)
            e_start.append(start)
            e_n.append(n)
            ids.extend(chunk)
            if entry.prompt_logprobs:
                prompt_rows[d + i] = (row, n)
            row += n
            if entry.sample and not entry.is_verify:
                samples.append((row - 1, [seq.slot] + [f.slot for f in entry.forks]))
        e_slot_a = np.array(e_slot, dtype=np.int64)
        e_n_a = np.array(e_n, dtype=np.int64)
        counts = np.concatenate([np.ones(d, dtype=np.int64), e_n_a])
        qsl = np.zeros(d + len(e_n) + 1, dtype=np.int32)
        np.cumsum(counts, out=qsl[1:])
        tok_pos = np.concatenate([d_pos, np.repeat(np.array(e_start, dtype=np.int64), e_n_a) + ranges(e_n_a)])
        lead = next((k for k, n in enumerate(e_n) if n != 1), len(e_n))
        return StepLayout(
            tok_slot=np.concatenate([d_slot, np.repeat(e_slot_a, e_n_a)]),
            tok_pos=tok_pos,
            host_ids=np.concatenate([d_host, np.array(ids, dtype=np.int64)]),
            seq_slot=np.concatenate([d_slot, e_slot_a]),
            query_start_loc=qsl,
            seq_lens=np.concatenate([d_pos + 1, np.array(e_start, dtype=np.int64) + e_n_a]).astype(np.int32),
            num_decodes=d + lead,
            prompt_rows=prompt_rows,
            unsampled_slots=np.array([e.seq.slot for e in plan.entries if not e.sample], dtype=np.int64),
            verify=verify,
            rows_decodable=all(e.is_verify or e.num_tokens == 1 for e in plan.entries),
            sample_rows=np.concatenate([np.arange(d, dtype=np.int64)]
                                       + [np.full(len(slots), r, dtype=np.int64) for r, slots in samples]),
            sample_slot=np.concatenate([d_slot] + [np.array(slots, dtype=np.int64) for _, slots in samples]),
        )

    def _host_token(self, seq: Sequence, position: int) -> int:
        token = seq.token_ids[position]
        if token == PENDING:
            raise RuntimeError(f"sequence {seq.seq_id}: its input token at {position} is neither on the host "
                               f"nor on the device")
        return token

    def _device_token(self, seq: Sequence, start: int, n: int) -> int:
        if n != 1 or seq.token_ids[start] != PENDING or not self.dev_token[seq.slot]:
            raise RuntimeError(f"sequence {seq.seq_id}: tokens [{start}, {start + n}) include one that is "
                               f"not read back and not on the device")
        return -1

    # -- device side ------------------------------------------------------------------------------
    def device_inputs(self, layout: StepLayout, upload, host_lists: bool):
        """(input_ids [T] int64, positions [T] int64, AttentionMetadata) on the device, from one
        int64 and one int32 upload. host_lists: also give the reference ops their host lists."""
        t = layout.num_tokens
        ints = upload(np.concatenate([layout.tok_slot, layout.tok_pos, layout.host_ids, layout.seq_slot]))
        slot, pos, host, seq_slot = ints[:t], ints[t:2 * t], ints[2 * t:3 * t], ints[3 * t:]
        meta = self.attention_metadata(layout, self.slot_mapping(slot, pos), seq_slot, upload, host_lists)
        return self.input_ids(slot, host), pos, meta, slot

    def attention_metadata(self, layout: StepLayout, slot_mapping: torch.Tensor, seq_slot: torch.Tensor,
                           upload, host_lists: bool) -> AttentionMetadata:
        """The step's AttentionMetadata around its KV slots and its sequences' slots (device
        tensors): query starts and lengths in one int32 upload, the block tables gathered."""
        qsl, lens = layout.query_start_loc, layout.seq_lens
        small = upload(np.concatenate([qsl, lens]))
        return AttentionMetadata(
            slot_mapping=slot_mapping, query_start_loc=small[: len(qsl)], seq_lens=small[len(qsl):],
            block_tables=self.block_table.index_select(0, seq_slot),
            num_decodes=layout.num_decodes, max_query_len=int(np.max(np.diff(qsl))),
            max_seq_len=int(lens.max()),
            query_start_loc_host=qsl.tolist() if host_lists else [],
            seq_lens_host=lens.tolist() if host_lists else [],
        )

    def input_ids(self, slot: torch.Tensor, host: torch.Tensor) -> torch.Tensor:
        """[T] int64: the host's id where given, else the slot's last sampled token."""
        return torch.where(host >= 0, host, self.last_token[slot])

    def slot_mapping(self, slot: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """[T] int64 KV-cache slot of each token; -1 where pos < 0 (padding)."""
        bs = self.block_size
        p = pos.clamp(min=0)
        mapped = self.block_table[slot, p // bs].to(torch.int64) * bs + p % bs
        return torch.where(pos >= 0, mapped, torch.full_like(mapped, -1))

    def sample(self, layout: StepLayout, logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Draw each row's token for its slot (logits [R, V] f32, slots [R] int64 on the device);
        the tokens [R] int64 become the slots' next inputs, all on the device."""
        tokens = self.sampler.sample(logits, slots)
        self.last_token.index_copy_(0, slots, tokens)
        self.dev_token[layout.sample_slot] = True
        if len(layout.unsampled_slots):
            self.dev_token[layout.unsampled_slots] = False
        return tokens


def ranges(counts: np.ndarray) -> np.ndarray:
    """[sum(counts)] int64: 0..c-1 for each count c, concatenated."""
    total = int(counts.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total, dtype=np.int64) - starts
