"""The per-token output path's fast paths: the OutputBatch encoding (only set fields, rare fields
intact), the executor's publisher (encodes off the step thread), the mailbox's one timer per
request, a model without a tokenizer streaming with no detokenizer exchange, and the start-up
heap frozen out of full garbage collections."""

from __future__ import annotations

import asyncio

import pytest

from gpu_engine.errors import InvalidRequest
from gpu_engine.sampling_params import SamplingParams
from services.common import convert, streams
from services.common.proto import pb
from services.common.types import Delta, EngineRequest, ModelInfo
from services.executor.service import OutputPublisher
from services.gateway.core import GatewayCore, GenerateInput, _Group
from services.gateway.router import Mailbox
from services.gateway.samples import Sample, TextlessSession
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.core import load_core


def test_output_batches_carry_every_field_and_leave_zero_values_unset():
    deltas = [Delta("a", 0, 0, [5]),
              Delta("b", 2, 7, [1, 2], "stop", 2, 9, 4, queue_time_s=0.25,
                    prompt_logprobs=[None, {3: -0.5}]),
              Delta("c", 1, 3, [], "abort", error=("DeadlineExceeded", "late")),
              Delta("d", executor_lost=True),
              Delta("f", 3, 8, [4, 6], "length", 6, 5, 2, ("Overloaded", "full"), True,
                    [{4: -0.125}, {6: -0.25}], 0.5, [None, {1: -0.375}])]  # every field, by position
    assert convert.output_batch_from_bytes(convert.output_batch_to_bytes("e", deltas)) == deltas
    plain = pb.OutputBatch.FromString(convert.output_batch_to_bytes("e", deltas[:1])).deltas[0]
    assert [f.name for f, _ in plain.ListFields()] == ["request_id", "token_ids"]


class _Pipeline:
    def __init__(self, sent: list):
        self.sent = sent

    def xadd(self, key, fields, **kw):
        self.sent.append((key, convert.output_batch_from_bytes(fields[streams.FIELD])))

    def expire(self, key, ttl):
        pass

    def execute(self):
        pass


class _Redis:
    def __init__(self):
        self.sent: list = []

    def pipeline(self, transaction=False):
        return _Pipeline(self.sent)


def test_publisher_encodes_each_step_batch_in_its_thread_in_order():
    redis = _Redis()
    publisher = OutputPublisher(redis, "exec-1")
    steps = [[Delta(f"r{i}", 0, step, [step]) for i in range(3)] for step in range(5)]
    for deltas in steps:
        publisher("gw", deltas)
    publisher.close()
    assert redis.sent == [(streams.out_stream("gw"), d) for d in steps]


def test_a_batch_that_cannot_be_encoded_is_reported_and_publishing_goes_on():
    redis, failures = _Redis(), []
    publisher = OutputPublisher(redis, "exec-1", failures.append)
    publisher("gw", [Delta("bad", 0, 0, ["not a token id"])])
    good = [Delta("r", 0, 0, [7])]
    publisher("gw", good)
    publisher.close()
    assert len(failures) == 1 and failures[0].startswith("the output publisher failed: TypeError")
    assert redis.sent[-1] == (streams.out_stream("gw"), good)


def test_mailbox_keeps_one_timer_and_still_times_out():
    async def scenario():
        loop = asyncio.get_running_loop()
        box = Mailbox()
        loop.call_later(0.01, box.put, "x")
        assert await box.get_all(5.0) == ["x"]
        timer = box._timer
        loop.call_later(0.01, box.put, "y")
        assert await box.get_all(4.995) == ["y"] and box._timer is timer  # the same deadline
        t0 = loop.time()
        assert await box.get_all(0.05) is None  # an earlier expiry re-arms it
        assert loop.time() - t0 >= 0.05
        loop.call_later(0.08, box.put, "z")
        assert await box.get_all(1.0) == ["z"]  # a longer wait outlives the old expiry
        box.close()
        assert box._timer is None and timer.cancelled()

    asyncio.run(scenario())


class _NoTextTokenizer:
    """A tokenizer tier for a preset (token ids only) that fails the test if asked to detokenize."""

    def __init__(self):
        self.core = load_core(TokenizerConfig(model="llama-3.1-8b"))

    async def model_info(self) -> ModelInfo:
        return self.core.info

    async def detokenizer(self, *args, **kw):
        raise AssertionError("a model without a tokenizer needs no Detokenize stream")

    async def tokenize(self, text=None, messages=None, add_special_tokens=True):
        return self.core.tokenize(text, messages, add_special_tokens)


class _Intake:
    def __init__(self):
        self.core: GatewayCore | None = None

    async def submit(self, request):
        rid = request.request_id
        self.core.router.dispatch([Delta(rid, 0, 0, [11], num_prompt_tokens=2),
                                   Delta(rid, 0, 1, [12, 13], finish_reason="length")])

    async def abort(self, abort):
        raise AssertionError(f"nothing to abort, got {abort}")


def test_a_model_without_a_tokenizer_streams_ids_with_no_detokenizer():
    intake = _Intake()
    core = GatewayCore("gw", _NoTextTokenizer(), intake)
    intake.core = core
    assert load_core(TokenizerConfig(model="llama-3.1-8b")).info.token_ids_only
    assert convert.model_info_from_pb(convert.model_info_to_pb(core.tokenizer.core.info)).token_ids_only

    async def collect(params: SamplingParams) -> list:
        return [c async for c in core.generate(GenerateInput(params, token_ids=(5, 6)))]

    chunks = asyncio.run(collect(SamplingParams(max_tokens=3)))
    assert [t for c in chunks for t in c.token_ids] == [11, 12, 13]
    assert all(c.text == "" for c in chunks)
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage == (2, 3, 0)
    with pytest.raises(InvalidRequest, match="has no tokenizer: stop strings cannot match"):
        asyncio.run(collect(SamplingParams(max_tokens=3, stop=("x",))))


def test_a_textless_sample_takes_deltas_without_a_coroutine_as_take_does():
    deltas = [Delta("r", 0, 0, [5, 6], num_prompt_tokens=2, num_cached_tokens=1,
                    prompt_logprobs=[None, {4: -0.5}]),
              Delta("r", 0, 1, [6, 7], logprobs=[{6: -0.1}, {7: -0.2}]),  # one seen already
              Delta("r", 0, 3, []),  # nothing new
              Delta("r", 0, 3, [8], "stop", stop_token_id=8)]

    def sample() -> Sample:
        s = Sample("c", 0, EngineRequest("r", "gw", (3, 4), SamplingParams()), 2)
        s.detok = TextlessSession()
        return s

    now, slow = sample(), sample()
    assert now.textless
    taken = [now.take_now(d) for d in deltas]
    assert taken == [asyncio.run(slow.take(d)) for d in deltas]
    assert taken[2] is None and [c.token_ids for c in taken if c] == [[5, 6], [7], [8]]
    assert taken[-1].usage == (2, 4, 1) and taken[-1].stop_reason == "8"


def test_a_group_streams_while_any_sample_has_not_ended():
    def group(*ended: bool) -> _Group:
        samples = [Sample("c", i, EngineRequest(f"r{i}", "gw", (1,), SamplingParams()), 1)
                   for i in range(len(ended))]
        for s, e in zip(samples, ended):
            s.ended = e
        return _Group(samples, Mailbox(), 0.0)

    for ended in [(False,), (True,), (True, False), (True, True), (False, True, False)]:
        g = group(*ended)
        assert g.streaming() == bool(g.live), ended


def test_the_proto_namespace_holds_its_names_after_the_first_lookup():
    assert pb.GenerateResponse is pb.__dict__["GenerateResponse"]
    assert pb.FINISH_REASON_STOP == pb.FinishReason.Value("FINISH_REASON_STOP")


def test_a_started_tier_freezes_its_heap_out_of_full_collections():
    import gc

    from services.run import freeze_startup_heap

    alive = len(gc.get_objects())
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() >= alive * 0.9  # what lived at start-up is no longer scanned
        assert len(gc.get_objects()) < alive * 0.1
    finally:
        gc.unfreeze()


class _StreamRedis:
    """The calls OutputReader makes of redis.asyncio, over a list of output-stream entries that
    one XREAD each hands over; XTRIMs are recorded."""

    def __init__(self, entries: list[tuple[bytes, bytes]]):
        self.entries = list(entries)
        self.trims: list[bytes] = []

    async def delete(self, key):
        pass

    async def info(self, section):
        return {"run_id": "one"}

    async def xread(self, streams_, count, block):
        if not self.entries:
            await asyncio.sleep(block / 1e3)
            return None
        key = next(iter(streams_))
        return [(key, [self.entries.pop(0)])]

    async def xtrim(self, key, minid, approximate):
        self.trims.append(minid)

    async def aclose(self):
        pass


def test_the_output_reader_routes_every_entry_and_trims_once_per_interval():
    from services.gateway.clients import OutputReader
    from services.gateway.router import Router

    entries = [(f"{i + 1}-0".encode(), {streams.FIELD: convert.output_batch_to_bytes(
        "exec", [Delta("r", 0, i, [10 + i])])}) for i in range(20)]

    async def run() -> tuple[list[int], list[bytes]]:
        redis = _StreamRedis(entries)
        router = Router()
        box = router.open("r")
        reader = OutputReader(redis, "gw", router)
        reader.TRIM_S = 0.5
        await reader.start()
        got: list[int] = []
        while len(got) < 20:
            got += [t for d in await box.get_all(5.0) for t in d.token_ids]
        assert redis.trims == []  # 20 reads within the first interval: no trim yet
        await asyncio.sleep(0.6)  # the interval passed: the next read trims up to what it read
        redis.entries.append((b"21-0", {streams.FIELD: convert.output_batch_to_bytes(
            "exec", [Delta("r", 0, 20, [30])])}))
        got += [t for d in await box.get_all(5.0) for t in d.token_ids]
        await reader.stop()
        return got, redis.trims

    got, trims = asyncio.run(run())
    assert got == [*range(10, 30), 30]
    assert trims == [b"21-0"]
