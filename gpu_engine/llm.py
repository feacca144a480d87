"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`, like TensorRT-LLM's and vLLM's."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace

from gpu_engine.config import EngineConfig
from gpu_engine.engine import LLMEngine
from gpu_engine.errors import InvalidRequest
from gpu_engine.outputs import RequestOutput
from gpu_engine.sampling_params import OutputKind, SamplingParams

Prompt = str | Sequence[int]
Message = dict[str, str]


class LLM:
    """One model on one device, for batch generation in-process.

    `LLM()` serves the default model (SmolLM2-135M-Instruct) on the GPU if there is one, else the CPU.
    Keyword arguments are EngineConfig fields (dtype, device, load_format, max_model_len, ...);
    the ones not given take the offline defaults (config.batch_limits: a larger token budget on a
    big GPU than the serving executor's).
    """

    def __init__(self, model: str | None = None, **kwargs):
        unknown = set(kwargs) - EngineConfig.field_names()
        if unknown:
            raise TypeError(f"unknown LLM arguments: {sorted(unknown)}")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs), offline=True)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (all submitted at once, batched in flight); outputs in order.

        A prompt is a string (tokenized without a chat template) or a list of token ids.
        """
        batch = _as_batch(prompts)
        params = _per_prompt(sampling_params, len(batch))
        return self._run(batch, params)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template (with the generation prompt) to each conversation."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise InvalidRequest("this model has no tokenizer, so no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        batch = [tokenizer.apply_chat_template(list(c), add_generation_prompt=True, tokenize=True)
                 for c in conversations]
        params = _per_prompt(sampling_params, len(batch))
        return self._run(batch, params)

    def _run(self, batch: list[Prompt], params: list[SamplingParams]) -> list[RequestOutput]:
        ids = [f"llm-{next(self._ids)}" for _ in batch]
        try:
            for rid, prompt, p in zip(ids, batch, params):
                self.engine.add_request(rid, prompt, replace(p, output_kind=OutputKind.FINAL_ONLY))
            finals: dict[str, RequestOutput] = {}
            while len(finals) < len(ids):
                for out in self.engine.step():
                    if out.finished:
                        finals[out.request_id] = out
        except BaseException:
            self.engine.abort_request([i for i in ids if i in self.engine.requests])
            raise
        return [finals[rid] for rid in ids]


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]  # one prompt of token ids
    if not prompts:
        raise InvalidRequest("no prompts given")
    return prompts


def _per_prompt(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise InvalidRequest(f"{len(params)} SamplingParams for {n} prompts")
    return params
