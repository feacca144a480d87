"""Turning a StepPlan into the step's tensors: host arrays first (numpy), then one pinned,
non-blocking upload each, so preparing a step never waits for the GPU."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gpu_engine.ops import AttentionMetadata
from gpu_engine.sampler import Penalties, SamplingBatch, row_key
from gpu_engine.scheduler import PENDING, StepPlan


@dataclass
class HostBatch:
    """A step's inputs as host arrays, before they go to the device."""

    input_ids: np.ndarray  # [T] int64; PENDING where the token comes from the previous step
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [S + 1] int32
    seq_lens: np.ndarray  # [S] int32
    block_tables: list[list[int]]
    num_decodes: int
    sample_rows: list[int]  # hidden rows to sample from (repeated for forks)
    sample_owner: list[int]  # plan entry of each sampled row
    prompt_rows: dict[int, tuple[int, int]]  # plan entry -> (first row, count) of prompt-logprob rows
    pending_rows: list[int]  # rows whose input token is PENDING
    pending_seqs: list[int]  # their sequences' ids


@dataclass
class StepInputs:
    """The device side of a step (input_ids/positions/meta are None when a CUDA graph holds them)."""

    input_ids: torch.Tensor | None  # [T] int64
    positions: torch.Tensor | None  # [T] int64
    meta: AttentionMetadata | None
    sample_rows: torch.Tensor  # [R] int64
    sampling: SamplingBatch | None
    host: HostBatch


def build_host_batch(plan: StepPlan, block_size: int) -> HostBatch:
    bs = block_size
    n = len(plan.scheduled)
    qsl = np.zeros(n + 1, dtype=np.int32)
    lens = np.zeros(n, dtype=np.int32)
    ids: list[int] = []
    positions, slots = [], []
    tables: list[list[int]] = []
    sample_rows: list[int] = []
    sample_owner: list[int] = []
    prompt_rows: dict[int, tuple[int, int]] = {}
    pending_rows: list[int] = []
    pending_seqs: list[int] = []
    for e, entry in enumerate(plan.scheduled):
        seq, start, count = entry.seq, entry.start, entry.num_tokens
        if count == 1:
            token = seq.token_ids[start]
            ids.append(token)
            if token == PENDING:
                pending_rows.append(int(qsl[e]))
                pending_seqs.append(seq.seq_id)
            positions.append(np.array([start], dtype=np.int64))
            slots.append(np.array([seq.block_table[start // bs] * bs + start % bs], dtype=np.int64))
        else:
            ids.extend(seq.token_ids[start : start + count])
            pos = np.arange(start, start + count, dtype=np.int64)
            positions.append(pos)
            slots.append(np.asarray(seq.block_table, dtype=np.int64)[pos // bs] * bs + pos % bs)
        if entry.prompt_logprobs:
            prompt_rows[e] = (int(qsl[e]), count)
        qsl[e + 1] = qsl[e] + count
        lens[e] = start + count
        tables.append(seq.block_table)
        if entry.sample:
            sample_rows.extend([int(qsl[e + 1]) - 1] * entry.num_samples)
            sample_owner.extend([e] * entry.num_samples)
    return HostBatch(
        input_ids=np.asarray(ids, dtype=np.int64), positions=np.concatenate(positions),
        slot_mapping=np.concatenate(slots), query_start_loc=qsl, seq_lens=lens, block_tables=tables,
        num_decodes=plan.num_decodes, sample_rows=sample_rows, sample_owner=sample_owner,
        prompt_rows=prompt_rows, pending_rows=pending_rows, pending_seqs=pending_seqs,
    )


def padded_tables(tables: list[list[int]], width: int | None = None) -> np.ndarray:
    """[S, width] int32 block tables, padded with block 0."""
    width = width or max(len(t) for t in tables)
    out = np.zeros((len(tables), width), dtype=np.int32)
    for i, t in enumerate(tables):
        out[i, : len(t)] = t
    return out


class InputBuilder:
    """Uploads host arrays to the device without blocking the host."""

    def __init__(self, device: torch.device, vocab_size: int):
        self.device = device
        self.vocab_size = vocab_size
        self.pinned = device.type == "cuda"

    def upload(self, array: np.ndarray | list, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = torch.from_numpy(array) if isinstance(array, np.ndarray) else torch.tensor(array, dtype=dtype)
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        if not self.pinned:
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def inputs(self, plan: StepPlan, host: HostBatch, with_forward: bool) -> StepInputs:
        meta = input_ids = positions = None
        if with_forward:
            qsl, lens = host.query_start_loc, host.seq_lens
            meta = AttentionMetadata(
                slot_mapping=self.upload(host.slot_mapping),
                query_start_loc=self.upload(qsl),
                seq_lens=self.upload(lens),
                block_tables=self.upload(padded_tables(host.block_tables)),
                num_decodes=host.num_decodes,
                max_query_len=int(np.max(np.diff(qsl))),
                max_seq_len=int(lens.max()),
                query_start_loc_host=qsl.tolist(),
                seq_lens_host=lens.tolist(),
            )
            input_ids = self.upload(host.input_ids)
            positions = self.upload(host.positions)
        return StepInputs(
            input_ids=input_ids, positions=positions, meta=meta,
            sample_rows=self.upload(host.sample_rows, torch.int64),
            sampling=self.sampling_batch(plan, host.sample_owner) if host.sample_owner else None,
            host=host,
        )

    def sampling_batch(self, plan: StepPlan, owners: list[int]) -> SamplingBatch:
        temps, top_k, top_p, min_p, keys, positions = [], [], [], [], [], []
        pen_rows, banned = [], []
        fork_index: dict[int, int] = {}
        for r, e in enumerate(owners):
            seq = plan.scheduled[e].seq
            req = seq.request
            p = req.params
            k = fork_index.get(e, 0)
            fork_index[e] = k + 1
            temps.append(p.temperature)
            top_k.append(p.top_k)
            top_p.append(p.top_p)
            min_p.append(p.min_p)
            keys.append(row_key(req.seed, seq.index + k))
            positions.append(seq.num_output_tokens)
            if p.needs_penalties:
                pen_rows.append(r)
            if seq.num_output_tokens < p.min_tokens:
                stop_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(req.eos_token_ids))
                if stop_ids:
                    banned.append((r, stop_ids))
        all_greedy = not any(temps)
        params = np.array([temps, top_p, min_p], dtype=np.float32)
        ints = np.array([top_k, keys, positions], dtype=np.int64)
        p_dev = self.upload(params) if not all_greedy else None
        i_dev = self.upload(ints) if not all_greedy else None
        return SamplingBatch(
            temperature=p_dev[0] if p_dev is not None else None,
            top_k=i_dev[0] if i_dev is not None else None,
            top_p=p_dev[1] if p_dev is not None else None,
            min_p=p_dev[2] if p_dev is not None else None,
            keys=i_dev[1] if i_dev is not None else None,
            positions=i_dev[2] if i_dev is not None else None,
            all_greedy=all_greedy,
            any_top_k=any(k > 0 for k in top_k),
            any_top_p=any(x < 1.0 for x in top_p),
            any_min_p=any(m > 0 for m in min_p),
            penalties=self.penalties(plan, owners, pen_rows) if pen_rows else None,
            banned=banned or None,
        )

    def penalties(self, plan: StepPlan, owners: list[int], rows: list[int]) -> Penalties:
        """Prompt-occurrence masks and output counts for the rows with penalties (sync steps only)."""
        prompt_mask = np.zeros((len(rows), self.vocab_size), dtype=np.bool_)
        counts = np.zeros((len(rows), self.vocab_size), dtype=np.float32)
        factors = np.zeros((3, len(rows)), dtype=np.float32)
        for i, r in enumerate(rows):
            seq = plan.scheduled[owners[r]].seq
            p = seq.request.params
            prompt_mask[i, seq.request.prompt_token_ids] = True
            np.add.at(counts[i], seq.output_token_ids, 1.0)
            factors[:, i] = (p.repetition_penalty, p.presence_penalty, p.frequency_penalty)
        f = self.upload(factors)
        return Penalties(
            rows=self.upload(rows, torch.int64), prompt_mask=self.upload(prompt_mask),
            output_counts=self.upload(counts), repetition=f[0], presence=f[1], frequency=f[2],
        )
