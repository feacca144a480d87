"""What the engine returns: one RequestOutput per request, one CompletionOutput per sample, and
EngineStats for its capacity. No torch, so the services can use these types alone."""

from __future__ import annotations

from dataclasses import dataclass, field

# A position's logprobs: {token_id: logprob} holding the chosen (or prompt) token and the top-N.
Logprobs = dict[int, float]


@dataclass
class CompletionOutput:
    """One sample of a request.

    With OutputKind.DELTA, `token_ids`, `text` and `logprobs` hold only what is new since the last
    report; otherwise they hold everything so far.
    """

    index: int
    token_ids: list[int]
    text: str = ""
    finish_reason: str | None = None
    """None while running; "stop" (eos, stop token or stop string), "length" or "abort"."""
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the sample, if any."""
    logprobs: list[Logprobs] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[Logprobs | None] | None = None
    """One entry per prompt token; the first is None (nothing precedes it)."""
    num_cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache."""
    metrics: dict = field(default_factory=dict)
    """Timestamps (time.monotonic): arrival, first_scheduled, first_token, finished."""
    num_draft_tokens: int = 0
    """Speculative decoding: tokens drafted for this request and verified (all its samples)."""
    num_accepted_tokens: int = 0
    """Speculative decoding: drafted tokens the target accepted (all its samples)."""


@dataclass(frozen=True)
class EngineStats:
    """The executor's live capacity, published after its steps for admission."""

    num_total_blocks: int
    num_free_blocks: int
    block_size: int
    num_running: int
    num_waiting: int
    prefill_backlog_tokens: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    kv_cache_dtype: str = ""
    """The KV cache's element type (bfloat16, float8_e4m3fn...)."""
    num_blocks_at_model_dtype: int | None = None
    """How many blocks the cache's memory would hold in the model's dtype: equal to
    num_total_blocks unless the cache is FP8 (then about half of it)."""
    spec_num_drafts: int = 0
    """Speculative decoding, since start: verify entries run (one per sequence and step)."""
    spec_num_draft_tokens: int = 0
    """Drafted tokens verified."""
    spec_num_accepted_tokens: int = 0
    """Drafted tokens accepted."""
    spec_num_accepted_tokens_per_pos: tuple[int, ...] = ()
    """Index j: how often a verify entry's draft j (0-based) was accepted."""
    kernel_compiles_late: int = 0
    """Triton kernel specialisations after start-up (each one stalled the batch it ran in)."""

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_blocks / max(1, self.num_total_blocks)


@dataclass(frozen=True)
class Recovery:
    """What `LLMEngine.recover()` did after a step raised."""

    aborted: tuple[str, ...]
    """The requests of the running batch (the failed step's): aborted, their KV blocks freed."""
    batch: tuple[str, ...]
    """The running batch when the step failed, one line per sequence (for the log)."""
    integrity_error: str | None = None
    """None when the block pool checks out afterwards; else what is broken (stop using the engine)."""
