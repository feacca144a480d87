"""The model runner: owns the device, the weights and the KV cache memory; turns a StepPlan into
tensors, runs the forward pass and samples. The scheduler never sees a tensor.

A step is launched (`launch`: inputs uploaded, forward and sampling enqueued, sampled tokens copied
to pinned host memory behind an event) and later collected (`collect`: wait for that event, read the
tokens). Between the two the host is free to plan and launch the next step (async scheduling).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from gpu_engine.config import EngineConfig, ModelConfig
from gpu_engine.cuda_graphs import DecodeGraphs, decode_only
from gpu_engine.model import rope_cos_sin_cache
from gpu_engine.ops import AttentionMetadata, select_ops
from gpu_engine.outputs import Logprobs
from gpu_engine.quant.kv import kv_cache_dtype
from gpu_engine.sampler import gather_logprobs, sample
from gpu_engine.scheduler import SampledToken, StepPlan, StepResult
from gpu_engine.step_inputs import HostBatch, InputBuilder, build_host_batch, padded_tables

log = logging.getLogger(__name__)


@dataclass
class InFlight:
    """A launched step: what collect() needs to turn it into a StepResult."""

    plan: StepPlan
    host: HostBatch
    tokens: torch.Tensor | None  # [R] int64, on the host (pinned) once `event` fired
    logprob_rows: list[int] = field(default_factory=list)  # sample rows that asked for logprobs
    chosen: torch.Tensor | None = None  # [L] f32 host: their chosen tokens' logprobs
    top_v: torch.Tensor | None = None  # [L, N] f32 host
    top_i: torch.Tensor | None = None  # [L, N] int64 host
    prompt_logprobs: dict[int, list[Logprobs]] = field(default_factory=dict)
    event: torch.cuda.Event | None = None


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, cfg: EngineConfig, model, device: torch.device, max_model_len: int):
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.model = model
        self.device = device
        self.dtype = model.norm.dtype
        self.kv_dtype = kv_cache_dtype(cfg.kv_cache_dtype, self.dtype)  # the model's, or float8_e4m3fn
        self.ops = select_ops(device)
        self.max_model_len = max_model_len
        self.cos_sin = rope_cos_sin_cache(model_cfg, max_model_len, device)  # [max_len, head_dim] f32
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = cfg.block_size
        self.graphs: DecodeGraphs | None = None
        self.builder = InputBuilder(device, model_cfg.vocab_size)
        self._prev_tokens: torch.Tensor | None = None  # [R] int64: the last launch's samples
        self._prev_rows: dict[int, int] = {}  # seq_id -> its row in _prev_tokens
        self.last_parts: dict[str, float] = {}

    # -- KV cache memory --------------------------------------------------------------------------
    def bytes_per_block(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of one KV block over all layers, in the cache's dtype (or `dtype`)."""
        c = self.model_cfg
        elem = torch.empty((), dtype=dtype or self.kv_dtype).element_size()
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
        per_seq = -(-seq_len // self.block_size)
        self.allocate_kv_cache(num_seqs * per_seq)
        lens = np.array([seq_len] * (num_seqs - 1) + [num_tokens - seq_len * (num_seqs - 1)], dtype=np.int32)
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(num_seqs)]
        positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lens])
        slots = np.concatenate([np.arange(n, dtype=np.int64) + i * per_seq * self.block_size
                                for i, n in enumerate(lens)])
        qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        up = self.builder.upload
        meta = AttentionMetadata(
            slot_mapping=up(slots), query_start_loc=up(qsl), seq_lens=up(lens),
            block_tables=up(padded_tables(tables)), num_decodes=0, max_query_len=int(lens.max()),
            max_seq_len=int(lens.max()), query_start_loc_host=qsl.tolist(), seq_lens_host=lens.tolist(),
        )
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, up(positions), self.kv_caches, meta, self.cos_sin, self.ops)
        self.model.compute_logits(hidden[-min(num_seqs * 4, self.cfg.max_num_seqs):])

    def allocate_kv_cache(self, num_blocks: int) -> None:
        c = self.model_cfg
        shape = (c.num_layers, 2, num_blocks, c.num_kv_heads, self.block_size, c.head_dim)
        cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
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
        """Launch and collect one step (the synchronous loop)."""
        return self.collect(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> InFlight:
        t0 = time.perf_counter()
        self.builder.begin_step()
        host = build_host_batch(plan, self.block_size)
        graphed = self.graphs is not None and decode_only(plan) and self.graphs.padded_size(len(plan.scheduled))
        inputs = self.builder.inputs(plan, host, with_forward=not graphed)
        self.last_parts = {"prepare": time.perf_counter() - t0, "wait": 0.0}
        self.copy_blocks(plan.blocks_to_copy)
        if graphed:
            hidden = self.graphs.run(host, self._feed(host))
        else:
            if host.pending_rows:
                rows, src = self._feed(host)
                inputs.input_ids[rows] = src
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, self.cos_sin,
                                self.ops)
        flight = InFlight(plan=plan, host=host, tokens=None)
        if inputs.sampling is not None:
            logits = self.model.compute_logits(hidden[inputs.sample_rows])
            tokens = sample(logits, inputs.sampling)
            self._prev_tokens = tokens
            self._prev_rows = {}
            for r, e in enumerate(host.sample_owner):
                self._prev_rows.setdefault(plan.scheduled[e].seq.seq_id, r)
            self._launch_logprobs(plan, host, logits, tokens, flight)
            flight.tokens = self.builder.download(tokens)
        flight.prompt_logprobs = self._prompt_logprobs(plan, host, hidden)
        self.builder.end_step()
        if self.device.type == "cuda":
            flight.event = torch.cuda.Event()
            flight.event.record()
        return flight

    def collect(self, flight: InFlight) -> StepResult:
        """Wait for a launched step's tokens (the one host sync of a step) and return them."""
        t0 = time.perf_counter()
        if flight.event is not None:
            flight.event.synchronize()
        self.last_parts["wait"] = time.perf_counter() - t0
        samples: list[list[SampledToken]] = [[] for _ in flight.plan.scheduled]
        if flight.tokens is None:
            return StepResult(samples, flight.prompt_logprobs)
        token_list = flight.tokens.tolist()
        lps: dict[int, Logprobs] = {}
        if flight.logprob_rows:
            wants = [flight.plan.scheduled[flight.host.sample_owner[r]].seq.request.params.logprobs
                     for r in flight.logprob_rows]
            dicts = _logprob_dicts(
                [token_list[r] for r in flight.logprob_rows], flight.chosen.tolist(),
                None if flight.top_v is None else flight.top_v.tolist(),
                None if flight.top_i is None else flight.top_i.tolist(), wants,
            )
            lps = dict(zip(flight.logprob_rows, dicts))
        for r, (owner, tok) in enumerate(zip(flight.host.sample_owner, token_list)):
            samples[owner].append(SampledToken(tok, lps.get(r)))
        return StepResult(samples, flight.prompt_logprobs)

    def _feed(self, host: HostBatch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, tokens) on the device: the inputs sampled by the previous launch (PENDING ones)."""
        if not host.pending_rows:
            return None
        src = [self._prev_rows[s] for s in host.pending_seqs]
        rows = self.builder.upload(host.pending_rows, torch.int64)
        return rows, self._prev_tokens[self.builder.upload(src, torch.int64)]

    def _launch_logprobs(self, plan: StepPlan, host: HostBatch, logits, tokens, flight: InFlight) -> None:
        want = [plan.scheduled[e].seq.request.params.logprobs for e in host.sample_owner]
        rows = [r for r, w in enumerate(want) if w is not None]
        if not rows:
            return
        top_n = max(want[r] for r in rows)
        idx = self.builder.upload(rows, torch.int64)
        lps = torch.log_softmax(logits[idx], dim=-1)
        chosen, top_v, top_i = gather_logprobs(lps, tokens[idx], top_n)
        flight.logprob_rows = rows
        flight.chosen = self.builder.download(chosen)
        flight.top_v = None if top_v is None else self.builder.download(top_v)
        flight.top_i = None if top_i is None else self.builder.download(top_i)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = self.builder.upload([s for s, _ in pairs], torch.int64)
        dst = self.builder.upload([d for _, d in pairs], torch.int64)
        for k, v in self.kv_caches:
            if k.dtype.itemsize == 1:  # FP8: copied as bytes (index_put has no float8 kernels everywhere)
                k, v = k.view(torch.uint8), v.view(torch.uint8)
            k[dst] = k[src]
            v[dst] = v[src]

    def _prompt_logprobs(self, plan: StepPlan, host: HostBatch, hidden) -> dict[int, list[Logprobs]]:
        """Logprobs of each prompt token given its prefix (synchronous: such steps never overlap)."""
        out: dict[int, list[Logprobs]] = {}
        for e, (first, count) in host.prompt_rows.items():
            entry = plan.scheduled[e]
            seq = entry.seq
            next_ids = seq.token_ids[entry.start + 1 : entry.start + 1 + count]
            count = len(next_ids)
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


