"""The stack with the real engine: streamed output through gateway -> Redis -> scheduler ->
executor equals `LLM.generate` for the same greedy request.

Two models: a tiny random Llama whose vocabulary is the byte tokenizer's (conftest's byte_llama;
runs wherever transformers is installed), and the default model, SmolLM2-135M-Instruct, through
the real tokenizer tier (needs gpu_engine.tokenizer and gpu_engine.default_model)."""

from __future__ import annotations

import pytest

from services.common.proto import pb
from services.tokenizer.fake import ByteTokenizer
from tests.integration.svc_stack import real_engine as _engine

pytestmark = pytest.mark.timeout(300)
PROMPTS = ["Hello, world", "The capital of France is", "héllo 😀"]


def _streams_equal(stack_factory, engine, prompts, expected, max_tokens):
    """Greedy streams of `prompts` through a stack whose one executor runs `engine` (byte
    tokenizer): each equals its LLM.generate output in tokens, text and usage. Returns the
    streams' chunks."""
    tok = ByteTokenizer()
    stack = stack_factory(executors=0)
    stack.add_executor(engine=engine)
    stack.wait_executors(1)
    streams = []
    for prompt, want in zip(prompts, expected):
        chunks = stack.generate(prompt, max_tokens=max_tokens, temperature=0.0)
        tokens = [t for c in chunks for t in c.token_ids]
        assert tokens == list(want.outputs[0].token_ids)
        assert "".join(c.text for c in chunks) == tok.decode(tokens)
        assert chunks[-1].usage.completion_tokens == len(tokens)
        streams.append(chunks)
    stack.wait_idle()
    return streams


def test_stream_equals_llm_generate_tiny_model(stack_factory, byte_llama):
    from gpu_engine.llm import LLM
    from gpu_engine.sampling_params import SamplingParams

    tok = ByteTokenizer()
    expected = LLM(model=byte_llama, device="cpu", dtype="float32").generate(
        [tok.encode(p) for p in PROMPTS], SamplingParams(temperature=0.0, max_tokens=24))
    _streams_equal(stack_factory, _engine(byte_llama), PROMPTS, expected, 24)


def test_stream_equals_llm_generate_default_model(stack_factory):
    pytest.importorskip("gpu_engine.default_model")
    pytest.importorskip("gpu_engine.tokenizer")
    from gpu_engine.default_model import default_model_path
    from gpu_engine.llm import LLM
    from gpu_engine.sampling_params import SamplingParams

    model = str(default_model_path())
    llm = LLM(model=model, device="cpu", dtype="float32")
    expected = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=12))
    stack = stack_factory(executors=0, real_model=model)
    stack.add_executor(engine=llm.engine)
    stack.wait_executors(1)
    for prompt, want in zip(PROMPTS, expected):
        chunks = stack.generate(prompt, max_tokens=12, temperature=0.0)
        assert "".join(c.text for c in chunks) == want.outputs[0].text
        assert [t for c in chunks for t in c.token_ids] == list(want.outputs[0].token_ids)
        assert chunks[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)


def test_cancellation_frees_the_real_engines_blocks(stack_factory, byte_llama):
    engine = _engine(byte_llama)
    aborted: list[str] = []
    abort = engine.abort_request
    engine.abort_request = lambda ids: (aborted.extend(ids), abort(ids))[1]
    stack = stack_factory(executors=0)
    stack.add_executor(engine=engine)
    stack.wait_executors(1)
    idle = stack.state().executors[0]
    assert idle.num_free_blocks == idle.num_total_blocks
    call = stack.stub.Generate(pb.GenerateRequest(
        text="a long prompt " * 4, sampling=pb.SamplingParams(max_tokens=400, ignore_eos=True)),
        timeout=60)
    for _ in range(3):
        next(call)
    assert stack.state().executors[0].num_requests == 1
    call.cancel()
    stack.wait_idle(10)  # every block free again, nothing running
    assert len(aborted) == 1  # freed by the abort, not by finishing its 400 tokens


def test_speculative_steps_stream_several_tokens_exactly(stack_factory, byte_llama):
    """n-gram speculation in the executor: a step emits several tokens of a request at once; the
    stream carries them all, in order, equal to LLM.generate without speculation."""
    from gpu_engine.llm import LLM
    from gpu_engine.sampling_params import SamplingParams

    tok = ByteTokenizer()
    prompts = ["abcabcabcabcabcabc", "the cat the cat the cat"]
    expected = LLM(model=byte_llama, device="cpu", dtype="float32").generate(
        [tok.encode(p) for p in prompts], SamplingParams(temperature=0.0, max_tokens=32))
    engine = _engine(byte_llama, speculative_config={
        "method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
        "disable_when_slower": False})
    streams = _streams_equal(stack_factory, engine, prompts, expected, 32)
    sizes = [len(c.token_ids) for chunks in streams for c in chunks]
    assert engine.scheduler.spec_stats.num_accepted_tokens > 0 and max(sizes) > 1
