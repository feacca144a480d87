"""What the engine returns: one RequestOutput per request, one CompletionOutput per sample."""

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
