"""The model runner: owns the device, the weights and the KV cache memory; turns a StepPlan into
tensors, runs the forward pass and samples. The scheduler never sees a tensor."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from gpu_engine.config import EngineConfig, ModelConfig
from gpu_engine.cuda_graphs import DecodeGraphs, decode_only
from gpu_engine.model import rope_cos_sin_cache
from gpu_engine.ops import AttentionMetadata, select_ops
from gpu_engine.outputs import Logprobs
from gpu_engine.sampler import Penalties, SamplingBatch, gather_logprobs, row_key, sample
from gpu_engine.scheduler import SampledToken, ScheduledSeq, StepPlan, StepResult

log = logging.getLogger(__name__)


@dataclass
class HostBatch:
    """A step's inputs as host arrays (numpy), before they go to the device."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64
    query_start_loc: np.ndarray  # [S + 1] int32
    seq_lens: np.ndarray  # [S] int32
    block_tables: list[list[int]]
    num_decodes: int
    sample_rows: list[int]
    sample_owner: list[int]
    prompt_rows: dict[int, tuple[int, int]]


@dataclass
class StepInputs:
    input_ids: torch.Tensor | None  # [T] int64 (None when a CUDA graph holds the forward's inputs)
    positions: torch.Tensor | None  # [T] int64
    meta: AttentionMetadata | None
    sample_rows: torch.Tensor  # [R] int64: hidden rows to sample from (repeated for forks)
    sample_owner: list[int]  # [R] plan entry of each sampled row
    prompt_rows: dict[int, tuple[int, int]]  # plan entry -> (first row, count) of prompt-logprob rows
    sampling: SamplingBatch | None
    host: HostBatch


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, cfg: EngineConfig, model, device: torch.device, max_model_len: int):
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.model = model
        self.device = device
        self.dtype = model.norm.dtype
        self.ops = select_ops(device)
        self.max_model_len = max_model_len
        self.cos_sin = rope_cos_sin_cache(model_cfg, max_model_len, device)  # [max_len, head_dim] f32
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = cfg.block_size
        self.graphs: DecodeGraphs | None = None

    # -- KV cache memory --------------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        c = self.model_cfg
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * c.num_layers * c.num_kv_heads * self.block_size * c.head_dim * elem

    def num_blocks_for_memory(self) -> int:
        """How many KV blocks fit: a configured size on the CPU, what is left after the weights and
        a warm-up forward on a GPU."""
        if self.cfg.num_kv_blocks is not None:
            return self.cfg.num_kv_blocks
        if self.device.type != "cuda":
            return max(1, int(self.cfg.cpu_kv_cache_gib * 2**30) // self.bytes_per_block())
        return self._profile_gpu_blocks()

    def _profile_gpu_blocks(self) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        free_before, total = torch.cuda.mem_get_info(self.device)
        used_before = torch.cuda.memory_allocated(self.device)
        self._warmup_forward(self.cfg.max_num_batched_tokens)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.kv_caches = []
        torch.cuda.empty_cache()
        others = total - free_before - torch.cuda.memory_reserved(self.device)
        budget = total * self.cfg.gpu_memory_utilization - max(others, 0) - peak
        budget -= 512 * 2**20  # CUDA graphs and allocator slack
        log.info("KV budget %.2f GiB (peak %.2f GiB, weights+others %.2f GiB)", budget / 2**30, peak / 2**30,
                 (used_before + max(others, 0)) / 2**30)
        return max(0, int(budget // self.bytes_per_block()))

    def _warmup_forward(self, num_tokens: int) -> None:
        """One forward of `num_tokens` prompt tokens (as max-length sequences) through a throwaway cache."""
        num_tokens = max(1, num_tokens)
        seq_len = min(num_tokens, self.max_model_len)
        num_seqs = -(-num_tokens // seq_len)
        blocks_per_seq = -(-seq_len // self.block_size)
        self.allocate_kv_cache(num_seqs * blocks_per_seq)
        lens = [seq_len] * (num_seqs - 1) + [num_tokens - seq_len * (num_seqs - 1)]
        tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(num_seqs)]
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        positions = torch.cat([torch.arange(n, device=self.device) for n in lens])
        meta = self._metadata(
            [0] + np.cumsum(lens).tolist(), lens, tables,
            torch.cat([torch.tensor(t, device=self.device).repeat_interleave(self.block_size)[:n] * self.block_size
                       + torch.arange(n, device=self.device) % self.block_size for t, n in zip(tables, lens)]),
            num_decodes=0,
        )
        hidden = self.model(ids, positions, self.kv_caches, meta, self.cos_sin, self.ops)
        self.model.compute_logits(hidden[-min(num_seqs * 4, self.cfg.max_num_seqs):])

    def allocate_kv_cache(self, num_blocks: int) -> None:
        c = self.model_cfg
        shape = (c.num_layers, 2, num_blocks, c.num_kv_heads, self.block_size, c.head_dim)
        cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.kv_caches = [(cache[i, 0], cache[i, 1]) for i in range(c.num_layers)]

    # -- one step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture_graphs(self) -> float:
        """Capture decode CUDA graphs (GPU with kernels, unless enforce_eager); returns seconds."""
        if self.device.type != "cuda" or self.cfg.enforce_eager or self.ops.name != "triton":
            return 0.0
        self.graphs = DecodeGraphs(self, self.cfg.max_num_seqs)
        return self.graphs.capture()

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        if self.graphs is not None and decode_only(plan) and self.graphs.padded_size(len(plan.scheduled)):
            host = self.host_batch(plan)
            self.copy_blocks(plan.blocks_to_copy)
            hidden = self.graphs.run(host)
            inputs = self._sampling_inputs(plan, host)
        else:
            inputs = self.prepare(plan)
            self.copy_blocks(plan.blocks_to_copy)
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, self.cos_sin,
                                self.ops)
        samples: list[list[SampledToken]] = [[] for _ in plan.scheduled]
        if inputs.sampling is not None:
            logits = self.model.compute_logits(hidden[inputs.sample_rows])
            tokens = sample(logits, inputs.sampling)
            self._fill_samples(plan, inputs, logits, tokens, samples)
        prompt_lps = self._prompt_logprobs(plan, inputs, hidden)
        return StepResult(samples, prompt_lps)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = torch.tensor([s for s, _ in pairs], device=self.device)
        dst = torch.tensor([d for _, d in pairs], device=self.device)
        for k, v in self.kv_caches:
            k[dst] = k[src]
            v[dst] = v[src]

    def _fill_samples(self, plan, inputs: StepInputs, logits, tokens, samples) -> None:
        entries = plan.scheduled
        want = [entries[e].seq.request.params.logprobs for e in inputs.sample_owner]
        top_n = max((w for w in want if w is not None), default=None)
        token_list = tokens.tolist()
        lp_rows: list[Logprobs | None] = [None] * len(token_list)
        if top_n is not None:
            rows = [r for r, w in enumerate(want) if w is not None]
            idx = torch.tensor(rows, device=logits.device)
            lps = torch.log_softmax(logits[idx], dim=-1)
            chosen, top_v, top_i = gather_logprobs(lps, tokens[idx], top_n)
            lp_rows_sel = _logprob_dicts(
                tokens[idx].tolist(), chosen.tolist(),
                None if top_v is None else top_v.tolist(), None if top_i is None else top_i.tolist(),
                [want[r] for r in rows],
            )
            for r, d in zip(rows, lp_rows_sel):
                lp_rows[r] = d
        for r, (owner, tok) in enumerate(zip(inputs.sample_owner, token_list)):
            samples[owner].append(SampledToken(tok, lp_rows[r]))

    def _prompt_logprobs(self, plan: StepPlan, inputs: StepInputs, hidden) -> dict[int, list[Logprobs]]:
        out: dict[int, list[Logprobs]] = {}
        for e, (first, count) in inputs.prompt_rows.items():
            entry = plan.scheduled[e]
            seq = entry.seq
            next_ids = seq.token_ids[entry.start + 1 : entry.start + 1 + count]
            count = len(next_ids)  # the last row of the final chunk predicts a token not drawn yet
            if count == 0:
                out[e] = []
                continue
            lps = torch.log_softmax(self.model.compute_logits(hidden[first : first + count]), dim=-1)
            ids = torch.tensor(next_ids, device=lps.device)
            n = seq.request.params.prompt_logprobs or 0
            chosen, top_v, top_i = gather_logprobs(lps, ids, n)
            out[e] = _logprob_dicts(
                next_ids, chosen.tolist(), None if top_v is None else top_v.tolist(),
                None if top_i is None else top_i.tolist(), [n] * count,
            )
        return out

    # -- inputs -----------------------------------------------------------------------------------
    def host_batch(self, plan: StepPlan) -> HostBatch:
        """The step's token, position, slot and block-table arrays, on the host."""
        bs = self.block_size
        n = len(plan.scheduled)
        qsl = np.zeros(n + 1, dtype=np.int32)
        lens = np.zeros(n, dtype=np.int32)
        ids: list[int] = []
        positions, slots = [], []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        sample_owner: list[int] = []
        prompt_rows: dict[int, tuple[int, int]] = {}
        for e, entry in enumerate(plan.scheduled):
            seq, start, count = entry.seq, entry.start, entry.num_tokens
            ids.extend(seq.token_ids[start : start + count])
            if count == 1:
                pos = np.array([start], dtype=np.int64)
                slots.append(np.array([seq.block_table[start // bs] * bs + start % bs], dtype=np.int64))
            else:
                pos = np.arange(start, start + count, dtype=np.int64)
                slots.append(np.asarray(seq.block_table, dtype=np.int64)[pos // bs] * bs + pos % bs)
            positions.append(pos)
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
            prompt_rows=prompt_rows,
        )

    def _sampling_inputs(self, plan: StepPlan, host: HostBatch) -> StepInputs:
        """Inputs for the sampling half of a graph-replayed step (the forward's inputs are in the graph)."""
        return StepInputs(
            input_ids=None, positions=None, meta=None,
            sample_rows=torch.tensor(host.sample_rows, dtype=torch.int64, device=self.device),
            sample_owner=host.sample_owner, prompt_rows={},
            sampling=self._sampling_batch(plan, host.sample_owner) if host.sample_owner else None,
            host=host,
        )

    def prepare(self, plan: StepPlan) -> StepInputs:
        host = self.host_batch(plan)
        dev = self.device
        meta = self._metadata(host.query_start_loc.tolist(), host.seq_lens.tolist(), host.block_tables,
                              torch.from_numpy(host.slot_mapping).to(dev), host.num_decodes)
        return StepInputs(
            input_ids=torch.from_numpy(host.input_ids).to(dev),
            positions=torch.from_numpy(host.positions).to(dev),
            meta=meta,
            sample_rows=torch.tensor(host.sample_rows, dtype=torch.int64, device=dev),
            sample_owner=host.sample_owner,
            prompt_rows=host.prompt_rows,
            sampling=self._sampling_batch(plan, host.sample_owner) if host.sample_owner else None,
            host=host,
        )

    def _metadata(self, qsl, lens, tables, slot_mapping, num_decodes: int) -> AttentionMetadata:
        width = max(len(t) for t in tables)
        padded = np.zeros((len(tables), width), dtype=np.int32)
        for i, t in enumerate(tables):
            padded[i, : len(t)] = t
        dev = self.device
        return AttentionMetadata(
            slot_mapping=slot_mapping,
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            block_tables=torch.from_numpy(padded).to(dev),
            num_decodes=num_decodes,
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
            max_seq_len=max(lens),
            query_start_loc_host=list(qsl),
            seq_lens_host=list(lens),
        )

    def _sampling_batch(self, plan: StepPlan, owners: list[int]) -> SamplingBatch:
        temps, top_k, top_p, min_p, keys, positions = [], [], [], [], [], []
        pen_rows, banned = [], []
        fork_index: dict[int, int] = {}
        for r, e in enumerate(owners):
            entry: ScheduledSeq = plan.scheduled[e]
            seq, req = entry.seq, entry.seq.request
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
        dev = self.device
        return SamplingBatch(
            temperature=torch.tensor(temps, dtype=torch.float32, device=dev),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=dev),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=dev),
            min_p=torch.tensor(min_p, dtype=torch.float32, device=dev),
            keys=torch.tensor(keys, dtype=torch.int64, device=dev),
            positions=torch.tensor(positions, dtype=torch.int64, device=dev),
            all_greedy=all(t == 0 for t in temps),
            any_top_k=any(k > 0 for k in top_k),
            any_top_p=any(p < 1.0 for p in top_p),
            any_min_p=any(m > 0 for m in min_p),
            penalties=self._penalties(plan, owners, pen_rows) if pen_rows else None,
            banned=banned or None,
        )

    def _penalties(self, plan: StepPlan, owners: list[int], rows: list[int]) -> Penalties:
        vocab = self.model_cfg.vocab_size
        dev = self.device
        prompt_mask = torch.zeros(len(rows), vocab, dtype=torch.bool, device=dev)
        counts = torch.zeros(len(rows), vocab, dtype=torch.float32, device=dev)
        rep, pres, freq = [], [], []
        for i, r in enumerate(rows):
            seq = plan.scheduled[owners[r]].seq
            p = seq.request.params
            prompt_mask[i, torch.tensor(seq.request.prompt_token_ids, device=dev)] = True
            out = seq.output_token_ids
            if out:
                counts[i].index_add_(0, torch.tensor(out, device=dev), torch.ones(len(out), device=dev))
            rep.append(p.repetition_penalty)
            pres.append(p.presence_penalty)
            freq.append(p.frequency_penalty)
        return Penalties(
            rows=torch.tensor(rows, dtype=torch.int64, device=dev),
            prompt_mask=prompt_mask,
            output_counts=counts,
            repetition=torch.tensor(rep, dtype=torch.float32, device=dev),
            presence=torch.tensor(pres, dtype=torch.float32, device=dev),
            frequency=torch.tensor(freq, dtype=torch.float32, device=dev),
        )


def _logprob_dicts(tokens, chosen, top_v, top_i, wants) -> list[Logprobs]:
    out = []
    for r, tok in enumerate(tokens):
        d = {}
        if top_v is not None:
            for tid, val in zip(top_i[r][: wants[r]], top_v[r][: wants[r]]):
                d[tid] = val
        d[tok] = chosen[r]
        out.append(d)
    return out


