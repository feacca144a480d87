"""`n` and `prompt_logprobs` through the gRPC API (the gateway fans n out into one engine request
per sample): each sample's tokens, logprobs and the prompt's logprobs equal LLM.generate's, greedy
and seeded, on a tiny real model behind the full stack."""

from __future__ import annotations

import grpc
import pytest

from services.common.proto import pb
from services.tokenizer.fake import ByteTokenizer
from tests.integration.svc_stack import real_engine

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def reference(byte_llama):
    from gpu_engine.llm import LLM

    return LLM(model=byte_llama, device="cpu", dtype="float32")


@pytest.fixture
def stack(stack_factory, byte_llama):
    stack = stack_factory(executors=0)
    stack.add_executor(engine=real_engine(byte_llama))
    stack.wait_executors(1)
    return stack


def by_sample(chunks) -> dict[int, list]:
    out: dict[int, list] = {}
    for c in chunks:
        out.setdefault(c.index, []).append(c)
    return out


@pytest.mark.parametrize("sampling", [
    {"temperature": 0.0},
    {"temperature": 0.9, "top_p": 0.95, "seed": 1234},
    {"temperature": 1.0, "top_k": 20, "seed": -7, "presence_penalty": 0.5},
])
def test_n_samples_equal_llm_generate(stack, reference, sampling):
    from gpu_engine.sampling_params import SamplingParams

    tok = ByteTokenizer()
    prompt = "The capital of France is"
    want = reference.generate([tok.encode(prompt)], SamplingParams(n=3, max_tokens=12, logprobs=2,
                                                                   **sampling))[0]
    chunks = stack.generate(prompt, n=3, max_tokens=12, logprobs=2, **sampling)
    samples = by_sample(chunks)
    assert sorted(samples) == [0, 1, 2]
    for out in want.outputs:
        got = samples[out.index]
        tokens = [t for c in got for t in c.token_ids]
        assert tokens == list(out.token_ids), out.index
        assert "".join(c.text for c in got) == tok.decode(tokens)
        lps = [(e.token_id, dict(e.top_logprobs)) for c in got for e in c.logprobs]
        assert [t for t, _ in lps] == tokens
        for (t, top), ref in zip(lps, out.logprobs):
            assert top.keys() == ref.keys()
            assert all(abs(top[k] - ref[k]) < 1e-4 for k in ref)
        last = got[-1]
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(tok.encode(prompt)), 12)
        assert all(c.finish_reason == pb.FINISH_REASON_UNSPECIFIED for c in got[:-1])
    if "seed" not in sampling and sampling["temperature"] == 0.0:
        assert len({tuple(o.token_ids) for o in want.outputs}) == 1  # greedy: all alike
    stack.wait_idle()


def test_prompt_logprobs_on_the_first_response(stack, reference):
    from gpu_engine.sampling_params import SamplingParams

    tok = ByteTokenizer()
    prompt = "héllo wörld"
    ids = tok.encode(prompt)
    want = reference.generate([ids], SamplingParams(max_tokens=4, temperature=0.0,
                                                    prompt_logprobs=3))[0]
    chunks = stack.generate(prompt, max_tokens=4, temperature=0.0, prompt_logprobs=3)
    first = chunks[0]
    assert [e.token_id for e in first.prompt_logprobs] == ids
    assert not first.prompt_logprobs[0].HasField("logprob")  # nothing precedes the first token
    for entry, ref in zip(first.prompt_logprobs[1:], want.prompt_logprobs[1:]):
        assert abs(entry.logprob - ref[entry.token_id]) < 1e-4
        assert dict(entry.top_logprobs).keys() == ref.keys()
    assert all(not c.prompt_logprobs for c in chunks[1:])
    assert [t for c in chunks for t in c.token_ids] == list(want.outputs[0].token_ids)


def test_n_with_prompt_logprobs_and_generate_once(stack):
    chunks = stack.generate("abc", n=2, max_tokens=3, temperature=0.0, prompt_logprobs=0)
    with_lp = [c for c in chunks if c.prompt_logprobs]
    assert len(with_lp) == 1 and with_lp[0].index == 0  # sample 0's first response only
    with pytest.raises(grpc.RpcError) as err:
        stack.stub.GenerateOnce(pb.GenerateRequest(text="abc", sampling=pb.SamplingParams(n=2)),
                                timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "GenerateOnce returns one sample" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stack.generate("abc", n=129)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "n must be at least 1 and at most 128, got 129" in err.value.details()
