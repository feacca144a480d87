"""SpeculativeConfig: which proposer, how many tokens, and when speculation turns itself off.

Names follow vLLM's `speculative_config` ({"method": ..., "num_speculative_tokens": ..., ...}).
No torch here: EngineConfig validates its `speculative_config` dict through this module."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "draft_model", "eagle3")

# Until the GPU measurement of the batch size where a verify step stops paying (issue 10) sets it.
DEFAULT_DISABLE_ABOVE_BATCH_SIZE = 32


@dataclass(frozen=True)
class SpeculativeConfig:
    """One speculative-decoding setup of an engine."""

    method: str
    """"ngram" (prompt lookup in the request's own tokens), "draft_model" (a smaller checkpoint
    sharing the target's tokenizer) or "eagle3" (an EAGLE-3 head fed the target's hidden states)."""
    num_speculative_tokens: int
    """Tokens proposed per sequence and step (k); the target verifies them in one forward."""
    model: str | None = None
    """draft_model: the draft checkpoint folder; eagle3: the EAGLE-3 head folder."""
    prompt_lookup_min: int | None = None
    """ngram: shortest suffix n-gram that may match (default: prompt_lookup_max if given, else 2)."""
    prompt_lookup_max: int | None = None
    """ngram: longest suffix n-gram tried first (default: prompt_lookup_min if given, else 5)."""
    disable_above_batch_size: int = DEFAULT_DISABLE_ABOVE_BATCH_SIZE
    """A step with more running sequences than this runs without speculation (large batches are
    compute-bound, so verifying drafts costs more than it saves)."""
    disable_when_slower: bool = True
    """Measure, per batch size, the output tokens per second of steps that speculate and of steps
    that do not, and speculate only where it is faster (gpu_engine/spec/gate.py); False: always
    speculate up to disable_above_batch_size. Seeded sampled output with drafted distributions
    (draft model, EAGLE-3 at temperature > 0) is reproducible only with False: which steps speculate
    changes its draws."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config method must be one of {METHODS}, got {self.method!r}")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 16:
            raise ValueError(f"num_speculative_tokens must be an integer in [1, 16], got {k!r}")
        if self.method == "ngram":
            self._fill_lookup_bounds()
            if self.model is not None:
                raise ValueError(f"method 'ngram' takes no model (got model={self.model!r})")
        else:
            if not isinstance(self.model, str) or not self.model:
                what = "a draft checkpoint folder" if self.method == "draft_model" else "an EAGLE-3 head folder"
                raise ValueError(f"method {self.method!r} needs 'model': {what}")
            for name in ("prompt_lookup_min", "prompt_lookup_max"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} applies to method 'ngram' only, not {self.method!r}")
        b = self.disable_above_batch_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"disable_above_batch_size must be a positive integer, got {b!r}")
        if not isinstance(self.disable_when_slower, bool):
            raise ValueError(f"disable_when_slower must be true or false, got {self.disable_when_slower!r}")

    def _fill_lookup_bounds(self) -> None:
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        for name, value in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if lo is None and hi is None:
            lo, hi = 2, 5
        elif lo is None:
            lo = hi
        elif hi is None:
            hi = lo
        if lo > hi:
            raise ValueError(f"prompt_lookup_min ({lo}) must not exceed prompt_lookup_max ({hi})")
        object.__setattr__(self, "prompt_lookup_min", lo)
        object.__setattr__(self, "prompt_lookup_max", hi)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def parse_speculative_config(value: dict[str, Any] | SpeculativeConfig | None) -> SpeculativeConfig | None:
    """The SpeculativeConfig an EngineConfig's `speculative_config` dict describes (None: off)."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"speculative_config must be a JSON object (dict) or None, got {type(value).__name__}")
    known = [f.name for f in fields(SpeculativeConfig)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ValueError(f"speculative_config has unknown keys {unknown}; known keys: {known}")
    for name in ("method", "num_speculative_tokens"):
        if name not in value:
            raise ValueError(f"speculative_config needs {name!r} (got keys {sorted(value)})")
    return SpeculativeConfig(**value)
