"""The gateway's checks of a request against the served model, before anything is enqueued: the
prompt's and the stop token ids against the vocabulary, the prompt and max_tokens against the
context. SamplingParams checked its own fields already; the engine checks all of it again
(LLMEngine.add_request), so a library user gets the same errors."""

from __future__ import annotations

from collections.abc import Sequence

from gpu_engine.errors import InvalidRequest
from gpu_engine.sampling_params import SamplingParams
from services.common.types import ModelInfo


def check_request(prompt: Sequence[int], params: SamplingParams, info: ModelInfo) -> None:
    if not prompt:
        raise InvalidRequest("the prompt is empty")
    for what, ids in (("prompt", prompt), ("stop_token_ids", params.stop_token_ids)):
        bad = [t for t in ids if not 0 <= t < info.vocab_size]
        if bad:
            raise InvalidRequest(f"{what}: token id {bad[0]} is out of range: the vocabulary has "
                                 f"{info.vocab_size} tokens (ids 0..{info.vocab_size - 1})")
    if info.token_ids_only and params.stop:
        raise InvalidRequest(f"model {info.name!r} has no tokenizer: stop strings cannot match "
                             "(use stop_token_ids)")
    max_tokens = params.max_tokens or 1
    if info.max_context_length and len(prompt) + max_tokens > info.max_context_length:
        raise InvalidRequest(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) "
                             f"exceeds the context length {info.max_context_length}")
