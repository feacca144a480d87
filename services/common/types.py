"""The services' domain objects: what travels between tiers, as plain dataclasses.

convert.py turns them into protobuf and back; nothing else touches protobuf messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gpu_engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineRequest:
    """A request on its way to an executor (see streams.proto EngineRequest)."""

    request_id: str
    gateway_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    attempt: int = 0
    prior_output_token_ids: tuple[int, ...] = ()
    priority: int = 0
    arrival_time: float = 0.0
    deadline: float | None = None
    """Unix time after which the request is dropped; None means no deadline."""
    traceparent: str = ""
    """W3C trace context of the span that sent it (the gateway's enqueue, the scheduler's admit)."""
    queue_time_s: float = 0.0
    """Set by the scheduler when it admits the request: seconds this attempt waited."""
    client_request_id: str = ""
    """The caller's own request_id: a label for logs and traces, never a key."""


@dataclass(frozen=True)
class Abort:
    """A cancellation travelling on the request stream."""

    request_id: str
    reason: str = "cancelled"


@dataclass
class Delta:
    """What happened to one request in one executor step, or a scheduler notice about it."""

    request_id: str
    attempt: int = 0
    first_index: int = 0
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    """"stop", "length" or "abort" once finished."""
    stop_token_id: int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: tuple[str, str] | None = None
    """(error class name, message): the request failed."""
    executor_lost: bool = False
    logprobs: list[dict[int, float]] | None = None
    queue_time_s: float = 0.0
    """On the first delta of an attempt: the scheduler's queue time of that attempt."""
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """On the first delta of an attempt that asked for them: one entry per prompt token (the
    first is None: nothing precedes it)."""


@dataclass(frozen=True)
class KvEvent:
    stored: bool
    block_hash: bytes


@dataclass(frozen=True)
class Ended:
    """A request that ended on an executor on its own (finished, or failed there), not aborted."""

    request_id: str
    attempt: int


@dataclass(frozen=True)
class ExecutorState:
    """An executor's published state (see executor.proto ExecutorState)."""

    executor_id: str
    seq: int = 0
    full: bool = False
    num_total_blocks: int = 0
    num_free_blocks: int = 0
    block_size: int = 16
    num_running: int = 0
    num_waiting: int = 0
    prefill_backlog_tokens: int = 0
    max_num_seqs: int = 256
    last_admit_seq: int = 0
    max_model_len: int = 0
    draining: bool = False
    finished_request_ids: tuple[str, ...] = ()
    running_request_ids: tuple[str, ...] = ()
    kv_events: tuple[KvEvent, ...] = ()
    ended: tuple[Ended, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    token_ids_only: bool = False
    """No tokenizer: token ids in and out, no text (the gateway then detokenizes nothing)."""
