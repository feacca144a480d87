"""LLMEngine: requests in, one step at a time, outputs out. The executor service wraps this class."""

from __future__ import annotations

import logging
import random
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from gpu_engine.block_manager import BlockManager
from gpu_engine.config import PRESETS, EngineConfig, ModelConfig, batch_limits
from gpu_engine.errors import InvalidRequest, ModelLoadError
from gpu_engine.outputs import CompletionOutput, EngineStats, Recovery, RequestOutput
from gpu_engine.parallel.sharding import check_tensor_parallel
from gpu_engine.parallel.state import TPShard
from gpu_engine.parallel.workers import RankDriver, WorkerSpec, rank_device
from gpu_engine.quant import read_checkpoint_quant, resolve_quantization
from gpu_engine.runner import ModelRunner
from gpu_engine.sampling_params import OutputKind, SamplingParams
from gpu_engine.scheduler import Scheduler, SchedulerConfig
from gpu_engine.spec.decoding import SpecDecoder, drafter_bytes_per_block, load_drafter, make_proposer
from gpu_engine.spec.draft_cache import blocks_for_budget
from gpu_engine.spec.verify import warm_up_verify
from gpu_engine.sequence import Request, Sequence as Seq
from gpu_engine.step_times import StepTimes, step_kind
from gpu_engine.weights import load_model
from taxiway_kernels import compile_watch

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PREFILL_CHUNK_DEFAULTS = {False: 128, True: 2048}
"""EngineConfig.max_prefill_tokens_per_seq when None, by "is it a GPU"."""


class _SeqText:
    """Incremental text of one sequence, how much of it was reported, and how many of the
    sequence's tokens the detokenizer has seen."""

    def __init__(self, detok, num_tokens: int):
        self.detok = detok
        self.reported = 0
        self.fed = num_tokens


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but no CUDA GPU is available")
    return device


def resolve_dtype(name: str, model_cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return torch.float16 if model_cfg.torch_dtype == "float16" else torch.bfloat16


def resolve_model(config: EngineConfig) -> tuple[Path | None, ModelConfig]:
    """(checkpoint folder or None for a preset, model config)."""
    if config.model is None:
        from gpu_engine.default_model import default_model_path

        folder = default_model_path()
        return folder, ModelConfig.from_folder(folder)
    path = Path(config.model).expanduser()
    if path.is_dir():
        return path, ModelConfig.from_folder(path)
    if config.model in PRESETS:
        if config.load_format != "dummy":
            raise ModelLoadError(
                f"{config.model!r} is a preset with no checkpoint; use load_format='dummy' for random weights"
            )
        return None, ModelConfig.from_preset(config.model)
    raise ModelLoadError(
        f"model {config.model!r} is neither a folder nor a preset (presets: {', '.join(PRESETS)})"
    )


def _sample_index(seq: Seq) -> int:
    return seq.index


class LLMEngine:
    """Paged-KV, in-flight-batching engine for one model on one device."""

    def __init__(self, config: EngineConfig | None = None, *, offline: bool = False, **kwargs):
        """`kwargs` replace fields of `config`; `offline`: sized as the offline LLM class is (a
        larger default token budget on a big GPU, see config.batch_limits)."""
        config = replace(config, **kwargs) if config is not None else EngineConfig(**kwargs)
        self.config = config
        spec = config.speculative
        self.device = resolve_device(config.device)
        folder, self.model_config = resolve_model(config)
        self.dtype = resolve_dtype(config.dtype, self.model_config, self.device)
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        if self.max_model_len > self.model_config.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {self.model_config.max_position_embeddings}"
            )
        detected = read_checkpoint_quant(folder) if folder is not None else None
        self.quant_spec = resolve_quantization(config.quantization, detected, config.load_format == "dummy")
        check_tensor_parallel(self.model_config, config.tensor_parallel_size)
        if spec is not None and config.tensor_parallel_size > 1:
            raise ValueError("speculative decoding with tensor_parallel_size > 1 is not supported yet")
        card = torch.cuda.get_device_properties(self.device) if self.device.type == "cuda" else None
        self.max_num_seqs, self.max_num_batched_tokens = batch_limits(
            config, card.total_memory if card else None, card.name if card else "", offline=offline)
        self.driver = self._start_ranks(folder) if config.tensor_parallel_size > 1 else None
        try:
            self._start(folder)
        except BaseException:
            self.shutdown()
            raise

    def _start_ranks(self, folder: Path | None) -> RankDriver:
        """Start worker ranks 1..N-1 (they load their shards meanwhile) and join their group."""
        tp = self.config.tensor_parallel_size
        if self.device.type == "cuda":
            if self.device.index not in (None, 0):
                raise ValueError(f"tensor_parallel_size {tp} runs on cuda:0..{tp - 1}; device "
                                 f"{self.config.device!r} names another first GPU (use device 'cuda')")
            if torch.cuda.device_count() < tp:
                raise ValueError(f"tensor_parallel_size {tp} needs {tp} GPUs, this machine has "
                                 f"{torch.cuda.device_count()}")
            self.device = rank_device(self.device, 0)
            torch.cuda.set_device(self.device)
        worker = WorkerSpec(self.config, self.device, self.model_config, folder, self.dtype, self.quant_spec,
                            self.max_model_len, self.max_num_seqs, self.max_num_batched_tokens, init_method="")
        driver = RankDriver(worker)
        weakref.finalize(self, driver.stop)
        return driver

    def _start(self, folder: Path | None) -> None:
        config = self.config
        spec = config.speculative
        # Kernels specialised from here to the end of start-up are the warm-up's; later ones stall
        # the running batch (a warning each, and EngineStats.kernel_compiles_late). Only a GPU
        # compiles (the CPU runs torch ops, or Triton's interpreter).
        self.compile_watch = compile_watch.install() if self.device.type == "cuda" else compile_watch.CompileWatch()
        model = load_model(self.model_config, folder, self.dtype, self.device, self.quant_spec,
                           load_format=config.load_format, seed=config.seed,
                           kv_fp8=config.kv_cache_dtype == "fp8", shard=TPShard(0, config.tensor_parallel_size))
        drafter = (load_drafter(spec, self.model_config, self.dtype, self.device, dummy=config.load_format == "dummy")
                   if spec else None)
        self.tokenizer = _load_tokenizer(config.tokenizer or folder)
        eos = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None:
            eos |= set(self.tokenizer.eos_token_ids)
        self.eos_token_ids = frozenset(eos)
        self.runner = ModelRunner(self.model_config, config, model, self.device, self.max_model_len,
                                  self.max_num_seqs, self.max_num_batched_tokens, self.driver)
        if spec is not None and spec.method == "eagle3":  # every step keeps the head's inputs
            self.runner.aux_layers = drafter.cfg.aux_layers
        if spec is not None:  # verify steps replay the decode graphs: one row per token
            self.runner.graph_rows = min(self.max_num_seqs, spec.disable_above_batch_size) * (
                1 + spec.num_speculative_tokens)
        self.num_kv_blocks = self.runner.num_blocks_for_memory()
        draft_bpb = drafter_bytes_per_block(spec, drafter, config.block_size) if spec else 0
        if draft_bpb and config.num_kv_blocks is None:  # one budget, as many tokens in both caches
            target_bpb = self.runner.bytes_per_block()
            self.num_kv_blocks = blocks_for_budget(self.num_kv_blocks * target_bpb, target_bpb, draft_bpb)
        if self.num_kv_blocks * config.block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {self.num_kv_blocks * config.block_size} tokens "
                f"({self.num_kv_blocks} blocks of {config.block_size}), less than max_model_len "
                f"{self.max_model_len}: lower max_model_len or give the cache more memory"
            )
        self.runner.allocate_kv_cache(self.num_kv_blocks)
        # What the same memory holds in the model's dtype (reported beside an FP8 cache's count).
        self.num_kv_blocks_at_model_dtype = (
            self.num_kv_blocks * self.runner.bytes_per_block() // self.runner.bytes_per_block(self.dtype))
        self.warm_up_s = self.runner.warm_up(self.num_kv_blocks, verify=spec is not None)
        self.graph_capture_s = self.runner.capture_graphs()
        self.block_manager = BlockManager(self.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_batched_tokens=self.max_num_batched_tokens,
                max_num_seqs=self.max_num_seqs,
                enable_chunked_prefill=config.enable_chunked_prefill,
                policy=config.admission_policy,
                max_prefill_tokens_per_seq=config.max_prefill_tokens_per_seq
                or PREFILL_CHUNK_DEFAULTS[self.device.type == "cuda"],
                tail_overcommit=config.admission_tail_overcommit,
            ),
            self.block_manager,
        )
        self.spec = None if spec is None else SpecDecoder(spec, make_proposer(
            spec, drafter, target_model=model, num_blocks=self.num_kv_blocks, block_size=config.block_size,
            max_model_len=self.max_model_len, device=self.device,
            enable_prefix_caching=config.enable_prefix_caching))
        build_chain = getattr(self.spec.proposer, "build_chain", None) if self.spec else None
        if build_chain is not None and self.runner.graphs is not None:  # drafters' chains as decode steps
            self.graph_capture_s += build_chain(min(self.max_num_seqs, spec.disable_above_batch_size),
                                                spec.num_speculative_tokens, capture=True)
        if spec is not None:
            warm_up_verify(self.runner.compute_logits, self.model_config.hidden_size, spec.num_speculative_tokens,
                           self.device, self.dtype)
        self.compile_watch.mark()
        self.requests: dict[str, Request] = {}
        self._texts: dict[int, _SeqText] = {}
        self.step_times = StepTimes()
        self.async_scheduling = (self.device.type == "cuda" if config.async_scheduling is None
                                 else config.async_scheduling)
        self._inflight = None  # the launched step not yet collected (async scheduling)
        self._finished = None  # (plan, tokens emitted) of the step this step() collected
        self._rng = random.Random(config.seed)
        log.info("engine ready: %s on %s (%s, %s), %d KV blocks in %s (%d in %s), max_num_seqs %d, "
                 "max_num_batched_tokens %d; shape warm-up %.1f s, CUDA graphs %.1f s", self.model_config.name,
                 self.device, self.dtype, self.quant_spec.describe() if self.quant_spec else "unquantized",
                 self.num_kv_blocks, self.runner.kv_dtype, self.num_kv_blocks_at_model_dtype, self.dtype,
                 self.max_num_seqs, self.max_num_batched_tokens, self.warm_up_s, self.graph_capture_s)

    # -- requests ---------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        prior_output_token_ids: Sequence[int] = (),
    ) -> None:
        """Queue a request. `prior_output_token_ids` are tokens generated elsewhere (resume after a
        failure): they count as output (max_tokens, penalties, seeded positions) but are not
        reported again."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise InvalidRequest(f"request id {request_id!r} is already running")
        text, ids = self._tokenize(prompt)
        prior = [self._check_token(t, "prior_output_token_ids") for t in prior_output_token_ids]
        self._validate(ids, prior, params)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        request = Request(
            request_id=request_id, prompt=text, prompt_token_ids=ids, params=params,
            seed=seed & 0xFFFFFFFFFFFFFFFF, eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len, priority=priority, num_prior_output_tokens=len(prior),
        )
        request.metrics["arrival"] = request.arrival_time
        seq = self.scheduler.add(request, prior)
        if self._streams_text(request):
            self._attach_text(seq, seq.token_ids)
        self.requests[request_id] = request

    def abort_request(self, request_ids: str | Iterable[str]) -> list[RequestOutput]:
        """Stop requests now, returning their KV blocks to the pool at once; unknown ids are
        ignored. Returns their final outputs (finish_reason "abort")."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        outputs = []
        for rid in request_ids:
            request = self.requests.get(rid)
            if request is None:
                continue
            self.scheduler.abort(request)
            outputs.append(self._output(request, force=True))
            self._forget(request)
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self._inflight is not None

    def recover(self) -> Recovery:
        """After step() raised: forgets the step in flight, aborts every request of the running
        batch (the failed step's; their KV blocks return to the pool), then checks the pool against
        the requests left (waiting ones stay queued). The engine may go on only if the returned
        integrity_error is None."""
        self._inflight = None
        lost = None if self.driver is None else self.driver.lost
        running = self.scheduler.running
        batch = tuple(f"{s.request.request_id}[{s.index}]: {s.num_computed_tokens}/{s.num_tokens} "
                      f"tokens computed, {s.num_pending} pending, {len(s.block_table)} blocks"
                      for s in running)
        aborted = tuple(dict.fromkeys(s.request.request_id for s in running))
        try:
            self.abort_request(aborted)
            self.block_manager.check_integrity(
                [b for r in self.requests.values() for s in r.seqs for b in s.block_table])
        except Exception as exc:  # noqa: BLE001 - any inconsistency means the engine is unusable
            return Recovery(aborted, batch, f"{type(exc).__name__}: {exc}")
        return Recovery(aborted, batch, None if lost is None else f"the tensor-parallel group is down: {lost}")

    # -- the step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; returns the outputs it produced. Under tensor parallelism a step that
        raises may leave the ranks out of step: it raises TensorParallelError, the engine is lost."""
        if self.driver is None:
            return self._step()
        self.driver.check()  # a lost group stays lost, even for a step with nothing to run
        try:
            return self._step()
        except Exception as exc:
            raise self.driver.fail(exc) from exc

    def shutdown(self) -> None:
        """Stop the worker ranks of a tensor-parallel engine (nothing to do on one device); idempotent."""
        if self.driver is not None:
            self.driver.stop()

    def _step(self) -> list[RequestOutput]:
        """One step (see step()).

        With async scheduling (GPU), this plans and launches step N+1 before reading step N's
        tokens, so the host's work overlaps the GPU's; outputs then trail launches by one step.
        No request forces a synchronous step: penalties, bans and seeded draws live in the device
        Sampler, n > 1 samples fork as their prompt is planned, prompt logprobs are copied back with
        the step's tokens.
        """
        t0 = time.perf_counter()
        parts = dict.fromkeys(("wait", "collect", "update", "output", "propose"), 0.0)
        speculated = self.spec is not None and self.spec.active(len(self.scheduler.running))
        overlap = self.async_scheduling and not self._speculating()
        self._finished = None
        outputs: list[RequestOutput] = []
        if not overlap and self._inflight is not None:
            outputs = self._finish(self._inflight, parts)
            self._inflight = None
        t1 = time.perf_counter()
        plan = self.scheduler.schedule()
        t2 = time.perf_counter()
        launched = None
        if not plan.is_empty:
            launched = self.runner.launch(plan)
            t3 = time.perf_counter()
            self.scheduler.commit(plan)
            t2 += time.perf_counter() - t3  # commit counts as planning
        if overlap:
            if self._inflight is not None:
                outputs = self._finish(self._inflight, parts)
            self._inflight = launched
        elif launched is not None:  # (after the in-flight step's outputs, if one was finished first)
            outputs += self._finish(launched, parts)
        if launched is not None:
            launch = self.runner.last_parts
            self.step_times.add(step_kind(plan), plan.num_plain_decodes + len(plan.entries), plan.num_tokens,
                                time.perf_counter() - t0, schedule=t2 - t1, **launch, **parts)
        if self._finished is not None:
            finished, emitted = self._finished
            self.spec.observe(finished, speculated, emitted, time.perf_counter() - t0)
        if self.compile_watch.has_new():
            for e in self.compile_watch.new_since_mark():
                log.warning("kernel %s was specialised while serving (%s s; the start-up warm-up did not "
                            "cover it): %s", e["kernel"], e["seconds"], e["signature"])
        return outputs

    def _finish(self, flight, parts: dict[str, float]) -> list[RequestOutput]:
        result = self.runner.collect(flight)
        parts.update(self.runner.last_collect_parts)
        if self.runner.last_gpu is not None:
            self.step_times.add_gpu(step_kind(flight.plan), *self.runner.last_gpu)
        t0 = time.perf_counter()
        spec = self.scheduler.spec_stats
        verified, accepted = spec.num_drafts, spec.num_accepted_tokens
        touched = self.scheduler.update(flight.plan, result)
        if self.spec is not None:  # the tokens the step emitted, for the speculation gate
            plan = flight.plan
            emitted = plan.num_plain_decodes + spec.num_drafts - verified + spec.num_accepted_tokens - accepted
            emitted += sum(e.num_samples for e in plan.entries if e.sample and not e.is_verify)
            self._finished = (plan, emitted)
        t1 = time.perf_counter()
        outputs = self._process(touched)
        t2 = time.perf_counter()
        if self.spec is not None:  # drafts for the next step, from the tokens just read back
            self.spec.propose(self.scheduler, flight.plan, result)
        parts["update"] += t1 - t0
        parts["output"] += t2 - t1
        parts["propose"] += time.perf_counter() - t2
        return outputs

    def _speculating(self) -> bool:
        """Whether the next step may verify drafts, or draft after it: it then runs synchronously
        (a verify entry's tokens must be read back before the sequence is planned again). N-gram
        lookup drafts only where the proposer's look at the known tokens found a match
        (SpecDecoder.sync_next): the steps between overlap."""
        if self.spec is None:
            return False
        if self.scheduler.batch.drafting.any():
            return True
        return self.spec.active(len(self.scheduler.running)) and self.spec.sync_next

    def _process(self, touched: list[Seq]) -> list[RequestOutput]:
        """Outputs for the sequences update() says are due: finished ones, and streamed ones."""
        now = time.monotonic()
        changed: dict[str, Request] = {}
        for seq in touched:
            request = seq.request
            state = self._texts.get(seq.seq_id)
            if state is None and self._streams_text(request):  # a fork's first token
                state = self._attach_text(seq, seq.token_ids[: len(seq.token_ids) - seq.num_pending - 1])
            if state is not None:
                self._detokenize(seq, state)
            changed[request.request_id] = request
        outputs = []
        for request in changed.values():
            finished = request.finished
            if finished:
                request.metrics["finished"] = now
            out = self._output(request, finished=finished)
            if out is not None:
                outputs.append(out)
            if finished:
                self._forget(request)
        return outputs

    def _detokenize(self, seq: Seq, state: _SeqText) -> None:
        """Add the sequence's new tokens (one, or a verify step's several) to its text, one by
        one; a stop string ends the sequence at the token that completed it. The text of an eos or
        stop token is not part of the output."""
        end = len(seq.token_ids) - seq.num_pending
        if seq.finish_reason == "stop" and not isinstance(seq.stop_reason, str):
            end -= 1  # the stop token
        while state.fed < end:
            delta = state.detok.add_tokens([seq.token_ids[state.fed]])
            state.fed += 1
            if delta.stop is not None:
                self.scheduler.stop_string(seq, delta.stop, state.fed)
                return
        if seq.is_finished:
            state.detok.flush()

    def _output(self, request: Request, force: bool = False, finished: bool | None = None) -> RequestOutput | None:
        """The request's output now (None: FINAL_ONLY and not finished, unless forced). Runs for
        every streamed request every step, so it reads each sequence's counters once and slices
        only the tokens it reports. `finished`: request.finished, when the caller has it."""
        if finished is None:
            finished = request.finished
        params = request.params
        kind = params.output_kind
        if kind is OutputKind.FINAL_ONLY and not finished and not force:
            return None
        delta = kind is OutputKind.DELTA
        with_logprobs = params.logprobs is not None
        seqs = request.seqs if len(request.seqs) == 1 else sorted(request.seqs, key=_sample_index)
        outs = []
        drafted = accepted = 0
        for seq in seqs:
            tokens, prompt = seq.token_ids, seq.num_prompt_tokens
            end = len(tokens) - seq.num_pending  # placeholders are not reported
            first = seq.num_reported_tokens if delta else request.num_prior_output_tokens
            token_ids = tokens[prompt + first : end]
            n_lp = len(token_ids) if seq.logprobs else 0
            state = self._texts.get(seq.seq_id)
            text = ""
            if state is not None:
                full = state.detok.text
                text = full[state.reported:] if delta else full
                state.reported = len(full)
            elif self.tokenizer is not None and params.detokenize:
                text = self._final_text(seq)  # FINAL_ONLY without stop strings: decoded once, here
            outs.append(CompletionOutput(
                index=seq.index, token_ids=token_ids, text=text, finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                logprobs=seq.logprobs[len(seq.logprobs) - n_lp:] if with_logprobs else None,
                cumulative_logprob=seq.cumulative_logprob if with_logprobs else None,
            ))
            seq.num_reported_tokens = end - prompt
            drafted += seq.num_draft_tokens
            accepted += seq.num_accepted_tokens
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids, outputs=outs, finished=finished,
            prompt_logprobs=request.prompt_logprobs if params.prompt_logprobs is not None else None,
            num_cached_tokens=request.num_cached_tokens, metrics=dict(request.metrics),
            num_draft_tokens=drafted, num_accepted_tokens=accepted,
        )

    def _forget(self, request: Request) -> None:
        self.requests.pop(request.request_id, None)
        for seq in request.seqs:
            self._texts.pop(seq.seq_id, None)
            if self.spec is not None:
                self.spec.release(seq.seq_id)

    # -- state ------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        bm = self.block_manager
        spec = self.scheduler.spec_stats
        return EngineStats(
            num_total_blocks=bm.num_blocks, num_free_blocks=bm.num_free_blocks,
            block_size=bm.block_size, num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            prefill_backlog_tokens=self.scheduler.prefill_backlog_tokens(),
            prefix_cache_queries=bm.prefix_queries, prefix_cache_hits=bm.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            kv_cache_dtype=str(self.runner.kv_dtype).removeprefix("torch."),
            num_blocks_at_model_dtype=self.num_kv_blocks_at_model_dtype,
            spec_num_drafts=spec.num_drafts, spec_num_draft_tokens=spec.num_draft_tokens,
            spec_num_accepted_tokens=spec.num_accepted_tokens,
            spec_num_accepted_tokens_per_pos=tuple(spec.num_accepted_tokens_per_pos),
            kernel_compiles_late=self.compile_watch.num_late(),
        )

    def take_kv_events(self) -> list[tuple[str, bytes]]:
        return self.block_manager.take_events()

    # -- helpers ----------------------------------------------------------------------------------
    def _tokenize(self, prompt: str | Sequence[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt is empty")
            if self.tokenizer is None:
                raise InvalidRequest("this model has no tokenizer: pass the prompt as token ids")
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise InvalidRequest("prompt tokenizes to no tokens")
            return prompt, ids
        if not isinstance(prompt, (list, tuple)) and not hasattr(prompt, "tolist"):
            raise InvalidRequest(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        ids = [self._check_token(t, "prompt") for t in (prompt.tolist() if hasattr(prompt, "tolist") else prompt)]
        if not ids:
            raise InvalidRequest("prompt is empty (no token ids)")
        return None, ids

    def _check_token(self, token, what: str) -> int:
        if isinstance(token, bool) or not isinstance(token, int):
            raise InvalidRequest(f"{what} must hold integer token ids, got {token!r}")
        if not 0 <= token < self.model_config.vocab_size:
            raise InvalidRequest(
                f"{what} holds token id {token}, outside the vocabulary [0, {self.model_config.vocab_size})"
            )
        return token

    def _validate(self, ids: list[int], prior: list[int], params: SamplingParams) -> None:
        for t in params.stop_token_ids:
            self._check_token(t, "stop_token_ids")
        total = len(ids) + len(prior)
        if total >= self.max_model_len:
            raise InvalidRequest(
                f"prompt has {total} tokens, but the context length is {self.max_model_len}: "
                f"at most {self.max_model_len - 1} prompt tokens leave room for one generated token"
            )
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"length {self.max_model_len}; lower max_tokens to {self.max_model_len - len(ids)} or less"
            )
        if prior and params.n > 1:
            raise InvalidRequest("prior_output_token_ids needs n == 1")
        if params.stop and (self.tokenizer is None or not params.detokenize):
            raise InvalidRequest("stop strings need detokenization (a tokenizer and detokenize=True)")
        if not self.config.enable_chunked_prefill and total > self.max_num_batched_tokens:
            raise InvalidRequest(
                f"prompt has {total} tokens, more than max_num_batched_tokens "
                f"{self.max_num_batched_tokens}, and chunked prefill is off"
            )
        if self.config.admission_policy == "guaranteed_no_evict":
            room = self.max_model_len - len(ids)
            out = min(params.max_tokens or room, room)
            bs = self.config.block_size
            full = -(-(len(ids) + out) // bs)
            need = full + (params.n - 1) * (full - len(ids) // bs)
            if need > self.num_kv_blocks:
                raise InvalidRequest(
                    f"the request needs {need} KV blocks to finish, the cache has {self.num_kv_blocks}"
                )

    def _streams_text(self, request: Request) -> bool:
        """Text is built token by token for streamed outputs and stop strings; a FINAL_ONLY request
        without stop strings is decoded once when it finishes."""
        params = request.params
        return (self.tokenizer is not None and params.detokenize
                and (params.output_kind is not OutputKind.FINAL_ONLY or bool(params.stop)))

    def _final_text(self, seq: Seq) -> str:
        request = seq.request
        context = seq.num_prompt_tokens + request.num_prior_output_tokens
        state = self._attach_text(seq, seq.token_ids[:context], keep=False)
        tokens = seq.output_token_ids[request.num_prior_output_tokens:]
        if tokens and seq.finish_reason == "stop" and not isinstance(seq.stop_reason, str):
            tokens = tokens[:-1]  # the text of an eos or stop token is not part of the output
        state.detok.decode_whole(tokens)
        return state.detok.text

    def _attach_text(self, seq: Seq, context: list[int], keep: bool = True) -> _SeqText | None:
        """Text state for a sequence whose tokens so far are `context` (prompt + prior output)."""
        params = seq.request.params
        if self.tokenizer is None or not params.detokenize:
            return None
        from gpu_engine.detokenizer import IncrementalDetokenizer

        detok = IncrementalDetokenizer(
            self.tokenizer,
            prompt_token_ids=list(context),
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
            stream_hold_back=params.output_kind is OutputKind.DELTA,
        )
        state = _SeqText(detok, len(context))
        if keep:
            self._texts[seq.seq_id] = state
        return state


def _load_tokenizer(folder: Path | str | None):
    if folder is None or not (Path(folder) / "tokenizer.json").is_file():
        return None
    from gpu_engine.tokenizer import Tokenizer

    return Tokenizer.from_folder(folder)

