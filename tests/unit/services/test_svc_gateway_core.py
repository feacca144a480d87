"""GatewayCore without network: the tokenizer tier in-process, the intake scripted. Checks the
stream's text and usage, stop strings, resume after a lost executor (no gap, no duplicate, stale
attempts dropped), errors, cancellation and deadlines."""

from __future__ import annotations

import asyncio

import pytest

from gpu_engine.errors import DeadlineExceeded, InvalidRequest, Overloaded
from gpu_engine.sampling_params import SamplingParams
from services.common.types import Abort, Delta
from services.gateway.core import GatewayCore, GenerateInput
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.core import load_core

B = 3  # byte token offset of the fake tokenizer


def ids(text: str) -> list[int]:
    return [b + B for b in text.encode()]


class LocalSession:
    def __init__(self, session, on_add=None):
        self.session = session
        self.on_add = on_add

    async def add(self, token_ids, flush=False):
        if self.on_add is not None:
            self.on_add()  # the request took a delta: a spread intake sends the next one
        return self.session.add(token_ids, flush)

    async def aclose(self):
        self.session.close()


class LocalTokenizer:
    def __init__(self):
        self.core = load_core(TokenizerConfig(fake_engine=True))
        self.on_add = None

    async def tokenize(self, text=None, messages=None, add_special_tokens=True):
        return self.core.tokenize(text, messages, add_special_tokens)

    async def detokenizer(self, prompt_token_ids, **kw):
        return LocalSession(self.core.detokenizer(prompt_token_ids, **kw), self.on_add)

    async def model_info(self):
        return self.core.info

    async def token_strings(self, token_ids):
        return self.core.token_strings(token_ids)


class ScriptedIntake:
    """On each submit, plays `script(request)` (a list of deltas) into the router: at once, or
    `spread` one at a time, the next once the request took the previous one (so that each
    reaches the request's task alone, and leaves as a chunk of its own)."""

    def __init__(self, script, spread: bool = False):
        self.script = script
        self.spread = spread
        self.submitted, self.aborts = [], []
        self.core: GatewayCore | None = None
        self._pending: list = []

    async def submit(self, request):
        self.submitted.append(request)
        deltas = self.script(request)
        if not self.spread:
            self.core.router.dispatch(deltas)
            return
        self._pending += deltas
        self.next()

    def next(self) -> None:
        if self._pending:
            self.core.router.dispatch([self._pending.pop(0)])

    async def abort(self, abort):
        self.aborts.append(abort)


def make(script, timeout=5.0, spread=False, **core_options):
    intake = ScriptedIntake(script, spread)
    tokenizer = LocalTokenizer()
    core = GatewayCore("gw", tokenizer, intake, request_timeout_s=timeout, **core_options)
    intake.core = core
    if spread:
        tokenizer.on_add = lambda: asyncio.get_running_loop().call_soon(intake.next)
    return core, intake


async def collect(stream) -> list:
    return [c async for c in stream]


def gen(core, inp, **kw) -> list:
    """Every chunk of core.generate(inp), run on a fresh event loop."""
    return asyncio.run(collect(core.generate(inp, **kw)))


def run(core, text="hi", **params):
    return gen(core, GenerateInput(SamplingParams(**params), request_id="r", text=text))


def test_streams_text_and_usage():
    def script(req):
        toks = ids("Bonjour 😀")
        return [Delta(req.request_id, 0, 0, toks[:9], num_prompt_tokens=3, num_cached_tokens=2),
                Delta(req.request_id, 0, 9, toks[9:], finish_reason="length")]

    core, intake = make(script)
    chunks = run(core)
    assert "".join(c.text for c in chunks) == "Bonjour 😀"
    assert len(chunks) == 1  # both deltas were queued when the request's task woke: one chunk
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage == (3, 12, 2)
    assert intake.aborts == [] and len(core.router) == 0


def test_stop_string_split_across_tokens_aborts_the_request():
    def script(req):
        rid = req.request_id
        return [Delta(rid, 0, i, [t]) for i, t in enumerate(ids("abc<END>xyz"))]

    core, intake = make(script)
    chunks = run(core, stop=("<END>",))
    assert "".join(c.text for c in chunks) == "abc"
    assert (chunks[-1].finish_reason, chunks[-1].stop_reason) == ("stop", "<END>")
    assert intake.aborts == [Abort(intake.submitted[0].request_id, "stop_string")]


def test_lost_executor_resumes_without_gap_or_duplicate():
    answer = ids("0123456789")

    def script(req):
        rid = req.request_id
        if req.attempt == 0:
            return [Delta(rid, 0, 0, answer[:4]), Delta(rid, 0, 4, answer[4:6]),
                    Delta(rid, 0, executor_lost=True),
                    Delta(rid, 0, 6, answer[6:7])]  # a straggler of the lost attempt: dropped
        assert req.prior_output_token_ids == tuple(answer[:6])
        return [Delta(rid, 1, 5, answer[5:8]),  # overlaps what was streamed: deduped
                Delta(rid, 1, 8, answer[8:], finish_reason="length")]

    core, intake = make(script)
    chunks = run(core)
    assert [t for c in chunks for t in c.token_ids] == answer
    assert "".join(c.text for c in chunks) == "0123456789"
    assert [r.attempt for r in intake.submitted] == [0, 1]
    assert intake.aborts == []


def test_error_from_the_scheduler_is_raised_and_not_aborted_again():
    core, intake = make(lambda req: [Delta(req.request_id, 0, error=("Overloaded", "queue is full"))])
    with pytest.raises(Overloaded, match="queue is full"):
        run(core)
    assert intake.aborts == []


def test_cancel_and_deadline_abort_the_request():
    core, intake = make(lambda req: [Delta(req.request_id, 0, 0, ids("a"))])

    async def cancel_after_first():
        got = []

        async def consume():
            async for chunk in core.generate(GenerateInput(SamplingParams(), request_id="r", text="hi")):
                got.append(chunk)

        task = asyncio.ensure_future(consume())
        while not got:
            await asyncio.sleep(0.001)
        task.cancel()  # the client went away: gRPC and the HTTP front cancel the request's task
        await asyncio.gather(task, return_exceptions=True)
        return got

    assert [c.text for c in asyncio.run(cancel_after_first())] == ["a"]
    assert intake.aborts == [Abort(intake.submitted[0].request_id, "cancelled")]
    assert len(core.router) == 0 and core.active == 0
    core, intake = make(lambda req: [], timeout=0.05)
    with pytest.raises(DeadlineExceeded):
        run(core)
    assert intake.aborts == [Abort(intake.submitted[0].request_id, "cancelled")]


def test_input_validation():
    core, _ = make(lambda req: [])
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        run(core, text="")
    with pytest.raises(InvalidRequest, match="prompt: token id 999 is out of range"):
        gen(core, GenerateInput(SamplingParams(), token_ids=(1, 999)))
    with pytest.raises(InvalidRequest, match="stop_token_ids: token id 1000000000 is out of range"):
        run(core, min_tokens=2, stop_token_ids=(10**9,))
    with pytest.raises(InvalidRequest, match="exceeds the context length"):
        run(core, max_tokens=10_000)
    core.router.open("held", ("", "r"))
    with pytest.raises(InvalidRequest, match="already in flight"):
        run(core)


def test_every_request_gets_its_own_internal_id_and_ids_are_scoped_per_caller():
    core, intake = make(lambda req: [Delta(req.request_id, 0, 0, ids("ok"), finish_reason="length")])
    run(core)
    run(core)  # the same client id again, after the first ended
    first, second = (r.request_id for r in intake.submitted)
    assert first != second and first.startswith("gw-") and second.startswith("gw-")
    assert [r.client_request_id for r in intake.submitted] == ["r", "r"]
    core.router.open("held", ("alice", "r"))  # alice has "r" in flight
    with pytest.raises(InvalidRequest, match="already in flight"):
        gen(core, GenerateInput(SamplingParams(), request_id="r", text="hi"), caller="alice")
    out = gen(core, GenerateInput(SamplingParams(), request_id="r", text="hi"), caller="bob")
    assert "".join(c.text for c in out) == "ok"


def test_a_redis_restart_or_a_gap_resubmits_from_what_the_client_has():
    answer = ids("abcdefgh")

    def script(req):
        rid = req.request_id
        if req.attempt == 0:
            return [Delta(rid, 0, 0, answer[:2])]
        if req.attempt == 1:  # after the restart: part of its output never arrives
            assert req.prior_output_token_ids == tuple(answer[:2])
            return [Delta(rid, 1, 2, answer[2:4]), Delta(rid, 1, 6, answer[6:])]
        assert req.prior_output_token_ids == tuple(answer[:4])
        return [Delta(rid, 2, 4, answer[4:], finish_reason="length")]

    core, intake = make(script)

    async def restart_after_first():
        stream = core.generate(GenerateInput(SamplingParams(), request_id="r", text="hi"))
        first = await anext(stream)
        assert core.redis_restarted() == 1
        return first, await collect(stream)

    first, chunks = asyncio.run(restart_after_first())
    assert first.token_ids == answer[:2]
    assert [t for c in chunks for t in c.token_ids] == answer[2:]
    assert "".join(c.text for c in chunks) == "cdefgh"
    assert [r.attempt for r in intake.submitted] == [0, 1, 2]


def test_redis_lost_fails_the_requests_in_flight_at_once():
    from gpu_engine.errors import NotReady

    core, intake = make(lambda req: [Delta(req.request_id, 0, 0, ids("a"))])

    async def lose_after_first():
        stream = core.generate(GenerateInput(SamplingParams(), request_id="r", text="hi"))
        await anext(stream)
        assert core.redis_lost("unreachable for 10s") == 1
        await anext(stream)

    with pytest.raises(NotReady, match="lost Redis: unreachable for 10s"):
        asyncio.run(lose_after_first())


def test_n_samples_fan_out_with_derived_seeds_and_interleave():
    from gpu_engine.sampling_params import sample_seed

    def script(req):
        k = req.params.seed  # each sample answers something of its own
        text = "abc" if k == sample_seed(7, 0) else "xyz"
        return [Delta(req.request_id, 0, 0, ids(text[:2]), num_prompt_tokens=3,
                      prompt_logprobs=[None, {5: -0.5}] if req.params.prompt_logprobs else None),
                Delta(req.request_id, 0, 2, ids(text[2:]), finish_reason="length")]

    core, intake = make(script, spread=True)
    chunks = run(core, n=2, seed=7, max_tokens=3, prompt_logprobs=1)
    seeds = [r.params.seed for r in intake.submitted]
    assert seeds == [sample_seed(7, 0), sample_seed(7, 1)] and seeds[0] == 7
    assert [r.params.n for r in intake.submitted] == [1, 1]
    assert [r.params.prompt_logprobs for r in intake.submitted] == [1, None]
    texts = {i: "".join(c.text for c in chunks if c.index == i) for i in (0, 1)}
    assert texts == {0: "abc", 1: "xyz"}
    finals = [c for c in chunks if c.finish_reason]
    assert sorted(c.index for c in finals) == [0, 1] and all(c.usage == (3, 3, 0) for c in finals)
    with_lp = [c for c in chunks if c.prompt_logprobs]
    assert len(with_lp) == 1 and with_lp[0].index == 0 and with_lp[0].prompt_token_ids
    assert intake.aborts == [] and len(core.router) == 0


def test_queued_deltas_leave_as_one_chunk():
    from services.gateway.samples import coalesce

    a = Delta("r", 0, 0, [1, 2], num_prompt_tokens=3, logprobs=[{1: -1.0}, {2: -2.0}])
    b = Delta("r", 0, 2, [3], logprobs=[{3: -3.0}], finish_reason="length")
    other = Delta("s", 0, 0, [9])
    merged = coalesce([a, b, other, Delta("s", 0, 5, [7])])  # the last one leaves a gap
    assert [d.token_ids for d in merged] == [[1, 2, 3], [9], [7]]
    assert merged[0].finish_reason == "length" and merged[0].num_prompt_tokens == 3
    assert merged[0].logprobs == [{1: -1.0}, {2: -2.0}, {3: -3.0}]


def test_concurrency_limit_and_shutdown():
    core, intake = make(lambda req: [Delta(req.request_id, 0, 0, ids("a"))],
                        max_concurrent_requests=1)

    async def scenario():
        first = core.generate(GenerateInput(SamplingParams(), request_id="r", text="hi"))
        assert (await anext(first)).text == "a"
        with pytest.raises(Overloaded, match=r"holds 1 requests, its limit \(max_concurrent_requests=1\)"):
            await anext(core.generate(GenerateInput(SamplingParams(), text="hi")))
        assert core.shutdown() == 1
        rest = await collect(first)
        return rest

    rest = asyncio.run(scenario())
    assert [(c.finish_reason, c.usage) for c in rest] == [("abort", (3, 1, 0))]  # BOS + "hi"
    assert intake.aborts == [Abort(intake.submitted[0].request_id, "cancelled")]
    assert core.active == 0
