"""The fault suite, a busy executor (issue 8, finding 5): the default model on the CPU, a
1000-token prompt beside a running decode and short prompts that arrive while it is prefilled.
The per-sequence prefill cap (EngineConfig.max_prefill_tokens_per_seq, 128 on the CPU) keeps the
decode flowing and starts the short ones at once. Before, the whole prompt went into one step
(a 2000-token prompt held a 4-token request for 10 s)."""

from __future__ import annotations

import random
import time

import pytest

from services.common.proto import pb
from tests.integration.faults import Stream
from tests.integration.svc_stack import real_engine, wait_for

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def test_a_long_prompt_does_not_stall_short_ones(stack_factory, default_model_dir, fault_report):
    engine = real_engine(str(default_model_dir))
    assert engine.scheduler.config.max_prefill_tokens_per_seq == 128
    stack = stack_factory(executors=0, real_model=str(default_model_dir))
    stack.add_executor(engine=engine)
    stack.wait_executors(1)
    greedy = {"temperature": 0.0, "ignore_eos": True}
    decode = Stream(stack.stub, pb.GenerateRequest(
        text="Count from one to a hundred:", sampling=pb.SamplingParams(max_tokens=40, **greedy)),
        timeout=200)
    wait_for(lambda: len(decode.chunks) >= 2, 60, "the running decode")
    rng = random.Random(0)
    long_ids = [rng.randrange(100, 40000) for _ in range(1000)]
    long = Stream(stack.stub, pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=long_ids), sampling=pb.SamplingParams(max_tokens=2, **greedy)),
        timeout=200)
    time.sleep(0.5)  # it is being prefilled
    shorts = [Stream(stack.stub, pb.GenerateRequest(
        text=f"Say {word}.", sampling=pb.SamplingParams(max_tokens=2, **greedy)), timeout=200)
        for word in ("yes", "no", "maybe")]
    for s in [*shorts, long, decode]:
        s.result(200)
    long_ttft = long.first_token_s()
    short_ttft = max(s.first_token_s() for s in shorts)
    during = [b - a for a, b in zip(decode.times, decode.times[1:])
              if long.started < b < long.started + long_ttft]
    assert short_ttft < long_ttft / 2, (short_ttft, long_ttft)
    assert during and max(during) < long_ttft / 3, (during, long_ttft)
    fault_report(fault="1000-token prompt beside a decode and 3 short prompts (default model, CPU)",
                 streams=5, lost=0, duplicated=0, recover_s=round(short_ttft, 2),
                 note=f"short prompts' first token {short_ttft:.2f}s, the long one's "
                      f"{long_ttft:.2f}s; longest decode gap meanwhile {max(during):.2f}s")
