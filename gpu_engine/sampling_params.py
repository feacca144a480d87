"""Per-request sampling and stopping parameters."""

from __future__ import annotations

import enum
import math
import numbers
from dataclasses import dataclass, field

from gpu_engine import limits
from gpu_engine.errors import InvalidRequest


class OutputKind(enum.Enum):
    """What `LLMEngine.step()` reports for a request.

    CUMULATIVE: every step, the whole output so far. DELTA: every step, only what is new since the
    last report (what a streaming server wants). FINAL_ONLY: nothing until the request finishes.
    """

    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop, for one request.

    temperature 0 means greedy. Penalties follow vLLM/OpenAI: `repetition_penalty` (HF style,
    divides positive logits and multiplies negative ones of every token seen in prompt or output),
    `presence_penalty` and `frequency_penalty` (subtracted per token seen in the output).
    Logprobs are of the model's raw distribution (log-softmax of the logits before any processing).
    """

    n: int = 1
    """Number of samples per prompt; they share the prompt's KV blocks."""
    max_tokens: int | None = 16
    """Most tokens to generate per sample; None means up to the model's context length."""
    min_tokens: int = 0
    """EOS and stop token ids are ignored until this many tokens were generated."""
    temperature: float = 1.0
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p; (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 (or -1) keeps all."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's; [0, 1]."""
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    """Same seed and prompt give the same output, whatever else runs in the batch."""
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    """Stop strings, matched on the detokenized text; not included in the output by default."""
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    """Return the chosen token's logprob and the top-N logprobs (0 = only the chosen token's)."""
    prompt_logprobs: int | None = None
    """Return logprobs of the prompt tokens (and the top-N at each position)."""
    skip_special_tokens: bool = True
    detokenize: bool = True
    output_kind: OutputKind = OutputKind.CUMULATIVE
    extra: dict = field(default_factory=dict, compare=False, repr=False)
    """Caller-owned metadata carried through untouched (trace context, deadlines...)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        ids = tuple(self.stop_token_ids or ())
        if not all(_is_int(t) for t in ids):
            raise InvalidRequest(f"stop_token_ids must be integer token ids, got {list(ids)[:5]}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    def _validate(self) -> None:
        """Everything that needs no model; token ids against the vocabulary and lengths against
        the context are the engine's checks (LLMEngine.add_request). Limits: gpu_engine/limits.py."""
        def bad(msg: str) -> None:
            raise InvalidRequest(msg)

        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                bad(f"{name} must be a finite number, got {value!r}")
        for name in ("n", "min_tokens", "top_k", "max_tokens", "logprobs", "prompt_logprobs", "seed"):
            value = getattr(self, name)
            if value is not None and not _is_int(value):
                bad(f"{name} must be an integer, got {value!r}")
        if not 1 <= self.n <= limits.MAX_N:
            bad(f"n must be at least 1 and at most {limits.MAX_N}, got {self.n}")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            bad(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if not self.temperature >= 0.0:
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            bad(f"top_k must be 0 or -1 (disabled) or a positive integer, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0.0:
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        self._validate_stops(bad)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= limits.MAX_LOGPROBS:
                bad(f"{name} must be between 0 and {limits.MAX_LOGPROBS}, got {value}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            bad(f"seed must fit in 64 bits, got {self.seed}")
        if not isinstance(self.output_kind, OutputKind):
            bad(f"output_kind must be an OutputKind, got {self.output_kind!r}")

    def _validate_stops(self, bad) -> None:
        if len(self.stop) > limits.MAX_STOP_STRINGS:
            bad(f"at most {limits.MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                bad(f"stop strings must not be empty (and must be strings), got {s!r}")
            if len(s) > limits.MAX_STOP_STRING_CHARS:
                bad(f"a stop string may have at most {limits.MAX_STOP_STRING_CHARS} characters, "
                    f"got one of {len(s)}")
        if len(self.stop_token_ids) > limits.MAX_STOP_TOKEN_IDS:
            bad(f"at most {limits.MAX_STOP_TOKEN_IDS} stop_token_ids are allowed, got "
                f"{len(self.stop_token_ids)}")
        if any(t < 0 for t in self.stop_token_ids):
            bad(f"stop_token_ids must be non-negative, got {[t for t in self.stop_token_ids if t < 0][:5]}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


_GOLDEN = 0x9E3779B97F4A7C15
_M64 = 0xFFFFFFFFFFFFFFFF


def sample_seed(seed: int, index: int) -> int:
    """The seed of a one-sample request that draws exactly what sample `index` of a request with
    `seed` draws (the sampler keys sample i's stream by row_key(seed, i), a mix of
    seed ^ i * golden; gpu_engine.sampler), as a signed 64-bit value: how a server that fans a
    request of n samples out into n requests keeps `LLM.generate(n=...)`'s seeded samples."""
    value = (seed ^ (index * _GOLDEN)) & _M64
    return value - (1 << 64) if value >= 1 << 63 else value
