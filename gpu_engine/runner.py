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
from gpu_engine.cuda_graphs import DecodeGraphs
from gpu_engine.input_batch import InputBatch, StepLayout
from gpu_engine.mixed_graphs import MixedGraphs
from gpu_engine.model import rope_cos_sin_cache
from gpu_engine.ops import AttentionMetadata, select_ops
from gpu_engine.outputs import Logprobs
from gpu_engine.parallel.state import min_across_ranks
from gpu_engine.parallel.workers import RankDriver
from gpu_engine.quant.kv import kv_cache_dtype
from gpu_engine.sampler import gather_logprobs
from gpu_engine.spec.verify import VerifyFlight, collect_verify, launch_verify
from gpu_engine.step_inputs import InputBuilder, padded_tables
from gpu_engine.step_plan import StepPlan, StepResult

log = logging.getLogger(__name__)


@dataclass
class InFlight:
    """A launched step: what collect() needs to turn it into a StepResult."""

    plan: StepPlan
    layout: StepLayout | None
    tokens: torch.Tensor | None  # [R] int64, on the host (pinned) once `event` fired
    logprob_rows: list[int] = field(default_factory=list)  # sample rows that asked for logprobs
    logprob_wants: list[int] = field(default_factory=list)  # their top-N
    chosen: torch.Tensor | None = None  # [L] f32 host: their chosen tokens' logprobs
    top_v: torch.Tensor | None = None  # [L, N] f32 host
    top_i: torch.Tensor | None = None  # [L, N] int64 host
    prompt_rows: list[tuple[int, list[int], int, torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = field(
        default_factory=list)  # (index into plan.scheduled, next ids, top-N, chosen [C], top_v, top_i on the host)
    event: torch.cuda.Event | None = None  # after the step's last enqueued work
    start: torch.cuda.Event | None = None  # before its first
    prev_end: torch.cuda.Event | None = None  # the previous launch's `event`
    verify: VerifyFlight | None = None  # the step's verify entries (speculative decoding)
    aux_hidden: torch.Tensor | None = None  # [T, A * hidden]: residual streams for EAGLE-3 (aux_layers)


def warmup_token_counts(max_tokens: int) -> list[int]:
    """Token counts whose forwards meet every tile choice and integer specialisation a step of at
    most max_tokens tokens can: 1, each power of two p and p + 1 (p >= 16 divisible by 16, p + 1
    not), max_tokens and the largest multiple of 16 up to it (its bucket's both kinds)."""
    counts = {1, max_tokens, max(1, max_tokens - max_tokens % 16)}
    p = 2
    while p <= max_tokens:
        counts.update(c for c in (p, p + 1) if c <= max_tokens)
        p *= 2
    return sorted(counts)


class ModelRunner:
    """Runs the model for the engine. Under tensor parallelism, rank 0's runner has a `driver` that
    repeats each call touching the model or the KV cache on the worker ranks (whose own runners
    have none), so every rank runs the same forward on its shard."""

    def __init__(self, model_cfg: ModelConfig, cfg: EngineConfig, model, device: torch.device, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int, driver: RankDriver | None = None):
        self.model_cfg = model_cfg
        self.driver = driver
        self.cfg = cfg
        self.model = model
        self.num_kv_heads = model.layers[0].num_kv_heads  # this rank's share (all at tensor_parallel_size 1)
        self.device = device
        self.dtype = model.norm.dtype
        self.kv_dtype = kv_cache_dtype(cfg.kv_cache_dtype, self.dtype)  # the model's, or float8_e4m3fn
        self.ops = select_ops(device)
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.cos_sin = rope_cos_sin_cache(model_cfg, max_model_len, device)  # [max_len, head_dim] f32
        self.kv_caches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.block_size = cfg.block_size
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self.builder = InputBuilder(device)
        self.batch = InputBatch(max_num_seqs, -(-max_model_len // cfg.block_size), cfg.block_size,
                                model_cfg.vocab_size, device)
        self.last_parts: dict[str, float] = {}  # prepare / forward / sample of the last launch
        self.last_collect_parts: dict[str, float] = {}  # wait / collect of the last collect
        self.last_gpu: tuple[float, float | None] | None = None  # (device s, idle s before) of the last collect
        self.aux_layers: tuple[int, ...] = ()  # layers whose entering residual stream each step keeps (EAGLE-3)
        self.graph_rows = 0  # decode graphs are captured up to max(max_num_seqs, this) rows (verify steps)
        self._last_end: torch.cuda.Event | None = None

    # -- KV cache memory --------------------------------------------------------------------------
    def bytes_per_block(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of one KV block over all layers, in the cache's dtype (or `dtype`)."""
        c = self.model_cfg
        elem = torch.empty((), dtype=dtype or self.kv_dtype).element_size()
        return 2 * c.num_layers * self.num_kv_heads * self.block_size * c.head_dim * elem

    def num_blocks_for_memory(self) -> int:
        """How many KV blocks fit: a configured size on the CPU, what is left after the weights and
        a warm-up forward on a GPU; under tensor parallelism the fewest any rank has room for (each
        rank holds its heads' share of every block)."""
        if self.driver is not None:
            self.driver.profile()
        if self.cfg.num_kv_blocks is not None:
            blocks = self.cfg.num_kv_blocks
        elif self.device.type != "cuda":
            blocks = max(1, int(self.cfg.cpu_kv_cache_gib * 2**30) // self.bytes_per_block())
        else:
            blocks = self._profile_gpu_blocks()
        return min_across_ranks(blocks, self.device)

    def _profile_gpu_blocks(self) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        free_before, total = torch.cuda.mem_get_info(self.device)
        used_before = torch.cuda.memory_allocated(self.device)
        self._warmup_forward(self.max_num_batched_tokens)
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

    def _warmup_forward(self, num_tokens: int, num_blocks: int | None = None) -> None:
        """One forward of `num_tokens` prompt tokens (as max-length sequences): through a throwaway
        cache, or through the allocated one when num_blocks (its size) is given, its blocks reused
        as often as needed (nothing is cached yet: what it writes is overwritten before it is read).
        Block tables are as wide as a step's (max_model_len's blocks): Triton specialises on their
        stride."""
        num_tokens = max(1, num_tokens)
        seq_len = min(num_tokens, self.max_model_len)
        num_seqs = -(-num_tokens // seq_len)
        per_seq = -(-seq_len // self.block_size)
        if num_blocks is None:
            num_blocks = num_seqs * per_seq
            self._allocate(num_blocks)  # every rank runs this warm-up itself
        lens = np.array([seq_len] * (num_seqs - 1) + [num_tokens - seq_len * (num_seqs - 1)], dtype=np.int32)
        tables = [[(i * per_seq + j) % num_blocks for j in range(per_seq)] for i in range(num_seqs)]
        positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lens])
        slots = np.concatenate([np.asarray(t, dtype=np.int64)[np.arange(n) // self.block_size] * self.block_size
                                + np.arange(n) % self.block_size for t, n in zip(tables, lens)])
        qsl = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        up = self.builder.upload
        meta = AttentionMetadata(
            slot_mapping=up(slots), query_start_loc=up(qsl), seq_lens=up(lens),
            block_tables=up(padded_tables(tables, self.batch.block_table.shape[1])), num_decodes=0,
            max_query_len=int(lens.max()), max_seq_len=int(lens.max()), query_start_loc_host=qsl.tolist(),
            seq_lens_host=lens.tolist(),
        )
        ids = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        hidden = self.model(ids, up(positions), self.kv_caches, meta, self.cos_sin, self.ops)
        self.model.compute_logits(hidden[-min(num_seqs * 4, self.max_num_seqs):])

    @torch.inference_mode()
    def warm_up(self, num_blocks: int, verify: bool = False) -> float:
        """Compile, before any request waits for it, what an eager step can need: one forward per
        class of token count (kernels and GEMMs choose tiles by the count's power of two, and
        Triton specialises integers equal to 1 or divisible by 16), and the sampler's kernels
        (with the distributions speculative verify reads when `verify`). Decode batches are the
        CUDA graphs' (captured after this). GPU with kernels only; returns seconds."""
        if self.device.type != "cuda" or self.ops.name != "triton" or self.driver is not None:
            return 0.0  # tensor parallelism: the worker ranks would need each forward too
        t0 = time.perf_counter()
        for n in warmup_token_counts(self.max_num_batched_tokens):
            self._warmup_forward(n, num_blocks)
        self.batch.sampler.warm_up(probs=verify)
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """The paged KV cache: `num_blocks` blocks of this rank's KV heads, the same ids on every rank."""
        if self.driver is not None:
            self.driver.allocate_kv(num_blocks)
        self._allocate(num_blocks)

    def _allocate(self, num_blocks: int) -> None:
        """K and V of every layer, zeroed, in one tensor; with v_cache_token_major in two, V's last
        two dims stored swapped and seen through a transposed view (the kernels read either;
        zeros: the token-major decode reads slots past a context, which must hold finite values)."""
        c = self.model_cfg
        shape = (c.num_layers, 2, num_blocks, self.num_kv_heads, self.block_size, c.head_dim)
        if not self.cfg.v_cache_token_major:
            cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
            self.kv_caches = [(cache[i, 0], cache[i, 1]) for i in range(c.num_layers)]
            return
        per_layer = (c.num_layers, num_blocks, self.num_kv_heads)
        k = torch.zeros((*per_layer, self.block_size, c.head_dim), dtype=self.kv_dtype, device=self.device)
        v = torch.zeros((*per_layer, c.head_dim, self.block_size), dtype=self.kv_dtype, device=self.device)
        self.kv_caches = [(k[i], v[i].transpose(-1, -2)) for i in range(c.num_layers)]

    # -- one step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture_graphs(self) -> float:
        """Capture decode CUDA graphs (GPU with kernels, unless enforce_eager) and the prefill and
        mixed steps' pieces (gpu_engine/mixed_graphs.py), both keeping the residual streams
        EAGLE-3 drafts from when it runs; returns seconds."""
        if self.device.type != "cuda" or self.cfg.enforce_eager or self.ops.name != "triton":
            return 0.0
        if self.driver is not None:
            log.warning("tensor parallelism runs decode steps eagerly: CUDA graphs over NCCL are not captured yet")
            return 0.0
        self.graphs = DecodeGraphs(self, max(self.max_num_seqs, self.graph_rows))
        seconds = self.graphs.capture()
        if self.cfg.max_mixed_graph_tokens:
            top = min(self.max_num_batched_tokens, self.cfg.max_mixed_graph_tokens)
            self.mixed_graphs = MixedGraphs(self, top)
            seconds += self.mixed_graphs.capture(self.graphs.pool)
        return seconds

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        """Launch and collect one step (the synchronous loop)."""
        return self.collect(self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> InFlight:
        """Upload the step's inputs, enqueue forward and sampling; the tokens come back later."""
        t0 = time.perf_counter()
        up = self.builder.upload
        self.builder.begin_step()
        start = None
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        self.batch.apply(plan, up)
        layout = self.batch.layout(plan)
        graphed = self.graphs is not None and layout.decode_rows and self.graphs.padded_size(layout.num_tokens)
        pieces = (not graphed and self.mixed_graphs is not None
                  and self.mixed_graphs.padded_size(layout.num_tokens) is not None)
        t1 = time.perf_counter()
        self.copy_blocks(plan.blocks_to_copy)
        aux = None
        if graphed:
            hidden, tok_slot, aux = self.graphs.run(layout)
        elif pieces:
            hidden, tok_slot, aux = self.mixed_graphs.run(layout)
        else:
            ids, positions, meta, tok_slot = self.batch.device_inputs(layout, up, self.ops.name == "torch")
            if self.driver is not None:
                self.driver.forward(ids, positions, meta)
            hidden, aux = self.model.forward_aux(ids, positions, self.kv_caches, meta, self.cos_sin, self.ops,
                                                 self.aux_layers)
        t2 = time.perf_counter()
        flight = InFlight(plan=plan, layout=layout, tokens=None, start=start, prev_end=self._last_end,
                          aux_hidden=aux)
        if len(layout.sample_rows):
            tokens = self._sample(layout, hidden, tok_slot, flight)
            flight.tokens = self.builder.download(tokens)
        if layout.verify:
            flight.verify = launch_verify([(i, plan.entries[i], r) for i, r in layout.verify], hidden,
                                          self.model.compute_logits, self.batch.sampler, self.batch.logprobs,
                                          up, self.builder.download)
            self.batch.dev_token[[plan.entries[i].seq.slot for i, _ in layout.verify]] = False  # inputs on the host
        self._launch_prompt_logprobs(plan, layout, hidden, flight)
        self.builder.end_step()
        if self.device.type == "cuda":
            flight.event = torch.cuda.Event(enable_timing=True)
            flight.event.record()
            self._last_end = flight.event
        t3 = time.perf_counter()
        self.last_parts = {"prepare": t1 - t0, "forward": t2 - t1, "sample": t3 - t2}
        return flight

    def _sample(self, layout: StepLayout, hidden: torch.Tensor, tok_slot: torch.Tensor, flight: InFlight):
        """Sample every sample row for its slot (the Sampler: penalties, bans, seeded draws, all on
        the device); the tokens become their slots' next inputs on the device."""
        up = self.builder.upload
        if layout.rows_are_samples:
            logits = self.compute_logits(hidden)  # [R, V] f32
            slots = tok_slot
        else:
            logits = self.compute_logits(hidden[up(layout.sample_rows)])
            slots = up(layout.sample_slot)
        tokens = self.batch.sample(layout, logits, slots)  # [R] int64
        self._launch_logprobs(layout, logits, tokens, flight)
        return tokens

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [S, hidden] -> logits [S, vocab] f32 (the worker ranks compute their vocabulary share)."""
        if self.driver is not None:
            self.driver.logits(hidden)
        return self.model.compute_logits(hidden)

    def collect(self, flight: InFlight) -> StepResult:
        """Wait for a launched step's tokens (the one host sync of a step) and return them."""
        t0 = time.perf_counter()
        self.last_gpu = None
        if flight.event is not None:
            flight.event.synchronize()
            idle = None if flight.prev_end is None else flight.prev_end.elapsed_time(flight.start) / 1e3
            self.last_gpu = (flight.start.elapsed_time(flight.event) / 1e3, idle)
        t1 = time.perf_counter()
        prompt_lps = {e: _logprob_dicts(ids, c.tolist(), None if v is None else v.tolist(),
                                        None if i is None else i.tolist(), [n] * len(ids)) if ids else []
                      for e, ids, n, c, v, i in flight.prompt_rows}
        if flight.tokens is None:
            result = StepResult(token_ids=np.zeros(0, dtype=np.int64), prompt_logprobs=prompt_lps)
        else:
            tokens = flight.tokens.numpy().copy()
            lps: dict[int, Logprobs] = {}
            if flight.logprob_rows:
                dicts = _logprob_dicts(
                    tokens[flight.logprob_rows].tolist(), flight.chosen.tolist(),
                    None if flight.top_v is None else flight.top_v.tolist(),
                    None if flight.top_i is None else flight.top_i.tolist(), flight.logprob_wants,
                )
                lps = dict(zip(flight.logprob_rows, dicts))
            result = StepResult(token_ids=tokens, logprobs=lps, prompt_logprobs=prompt_lps)
        if flight.verify is not None:
            result.verified = collect_verify(flight.verify, _logprob_dicts)
        result.aux_hidden = flight.aux_hidden
        self.last_collect_parts = {"wait": t1 - t0, "collect": time.perf_counter() - t1}
        return result

    def _launch_logprobs(self, layout: StepLayout, logits, tokens, flight: InFlight) -> None:
        want = self.batch.logprobs[layout.sample_slot]
        rows = np.flatnonzero(want >= 0)
        if not len(rows):
            return
        top_n = int(want[rows].max())
        idx = self.builder.upload(rows.astype(np.int64))
        lps = torch.log_softmax(logits[idx], dim=-1)
        chosen, top_v, top_i = gather_logprobs(lps, tokens[idx], top_n)
        flight.logprob_rows = rows.tolist()
        flight.logprob_wants = want[rows].tolist()
        flight.chosen = self.builder.download(chosen)
        flight.top_v = None if top_v is None else self.builder.download(top_v)
        flight.top_i = None if top_i is None else self.builder.download(top_i)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        src = self.builder.upload([s for s, _ in pairs], torch.int64)
        dst = self.builder.upload([d for _, d in pairs], torch.int64)
        if self.driver is not None:
            self.driver.copy_blocks(src, dst)
        self.copy_kv_blocks(src, dst)

    def copy_kv_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy blocks src [N] -> dst [N] (int64 on the device) in every layer's K and V."""
        for k, v in self.kv_caches:
            if k.dtype.itemsize == 1:  # FP8: copied as bytes (index_put has no float8 kernels everywhere)
                k, v = k.view(torch.uint8), v.view(torch.uint8)
            k[dst] = k[src]
            v[dst] = v[src]

    def _launch_prompt_logprobs(self, plan: StepPlan, layout: StepLayout, hidden, flight: InFlight) -> None:
        """Logprobs of each prompt token given its prefix, for the chunks that asked: computed and
        copied back with the step's tokens (only these rows pay; nothing waits for the device)."""
        scheduled = plan.scheduled if layout.prompt_rows else []
        for e, (first, count) in layout.prompt_rows.items():
            entry = scheduled[e]
            seq = entry.seq
            next_ids = seq.token_ids[entry.start + 1 : entry.start + 1 + min(count, seq.num_prompt_tokens - entry.start - 1)]
            n = seq.request.params.prompt_logprobs or 0
            if not next_ids:
                flight.prompt_rows.append((e, [], n, None, None, None))
                continue
            lps = torch.log_softmax(self.compute_logits(hidden[first : first + len(next_ids)]), dim=-1)
            chosen, top_v, top_i = gather_logprobs(lps, self.builder.upload(np.array(next_ids, dtype=np.int64)), n)
            down = self.builder.download
            flight.prompt_rows.append((e, next_ids, n, down(chosen), None if top_v is None else down(top_v),
                                       None if top_i is None else down(top_i)))


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


