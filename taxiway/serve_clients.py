"""The clients of `taxiway bench serve`: the gRPC gateway (asyncio, optionally several processes)
and the same engine in this process. Each runs a Workload and returns one RequestRecord per
request, timed with time.monotonic() (one clock for every process of this machine)."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import time
from collections import deque

from taxiway.serve_bench import RequestRecord, ServeBenchConfig, Workload

START_MARGIN_S = 1.0
"""Client processes start together this long after being spawned."""


def make_client(cfg: ServeBenchConfig):
    if cfg.target == "grpc":
        return GrpcClient(cfg)
    if cfg.target == "inprocess":
        return InProcessClient(cfg)
    raise ValueError(f"unknown target {cfg.target!r}")


class GrpcClient:
    """Streams Generate calls to a gateway over one aio channel per client process."""

    def __init__(self, cfg: ServeBenchConfig):
        import grpc

        from services.common.proto import Stub, pb

        with grpc.insecure_channel(cfg.address) as channel:
            self.info = Stub(channel, "Gateway").GetModelInfo(pb.GetModelInfoRequest(), timeout=30)

    def vocab_size(self) -> int:
        return self.info.vocab_size

    def run(self, workload: Workload, cfg: ServeBenchConfig, concurrency: int) -> list[RequestRecord]:
        procs = min(cfg.client_processes, len(workload.prompts))
        if procs == 1:
            return asyncio.run(_grpc_run(cfg, workload, concurrency, time.monotonic()))
        start = time.monotonic() + START_MARGIN_S + 0.5 * procs
        per = math.ceil(concurrency / procs) if concurrency else 0
        parts = [(cfg, Workload(workload.prompts[p::procs], workload.send_at[p::procs]), per, start)
                 for p in range(procs)]
        with multiprocessing.get_context("spawn").Pool(procs) as pool:
            results = pool.starmap(_grpc_run_sync, parts)
        records: list[RequestRecord] = [None] * len(workload.prompts)  # type: ignore[list-item]
        for p, part in enumerate(results):
            records[p::procs] = part
        return records

    def describe(self) -> dict:
        return {"target": {"kind": "grpc", "model": self.info.name,
                           "max_context_length": self.info.max_context_length}}

    def close(self) -> None:
        pass


def _grpc_run_sync(cfg, workload, concurrency, start) -> list[RequestRecord]:
    return asyncio.run(_grpc_run(cfg, workload, concurrency, start))


async def _grpc_run(cfg: ServeBenchConfig, workload: Workload, concurrency: int,
                    start: float) -> list[RequestRecord]:
    import grpc

    from services.common.proto import Stub, pb

    sampling = pb.SamplingParams(max_tokens=cfg.osl, min_tokens=cfg.osl, ignore_eos=True,
                                 temperature=0.0)
    limit = asyncio.Semaphore(concurrency) if concurrency else None
    async with grpc.aio.insecure_channel(cfg.address) as channel:
        stub = Stub(channel, "Gateway")

        async def one(prompt, send_at: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + send_at - time.monotonic()))
            if limit is not None:
                await limit.acquire()
            if isinstance(prompt, str):
                request = pb.GenerateRequest(text=prompt, sampling=sampling)
            else:
                request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling)
            record = RequestRecord(start=time.monotonic())
            try:
                async for chunk in stub.Generate(request, timeout=cfg.timeout_s):
                    if chunk.token_ids:
                        record.chunk_times.append(time.monotonic())
                        record.num_tokens += len(chunk.token_ids)
                if record.num_tokens != cfg.osl:
                    record.error = f"got {record.num_tokens} tokens, expected {cfg.osl}"
            except grpc.aio.AioRpcError as exc:
                record.error = f"{exc.code().name}: {exc.details()}"
            finally:
                if limit is not None:
                    limit.release()
            return record

        return list(await asyncio.gather(*(one(p, t) for p, t in zip(workload.prompts, workload.send_at))))


class InProcessClient:
    """The same workload through LLMEngine.step() in this process: the services' baseline."""

    def __init__(self, cfg: ServeBenchConfig):
        from gpu_engine.config import EngineConfig
        from gpu_engine.engine import LLMEngine

        self.engine = LLMEngine(EngineConfig(**cfg.engine))

    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    def run(self, workload: Workload, cfg: ServeBenchConfig, concurrency: int) -> list[RequestRecord]:
        from gpu_engine.sampling_params import OutputKind, SamplingParams

        engine = self.engine
        params = SamplingParams(max_tokens=cfg.osl, min_tokens=cfg.osl, ignore_eos=True, temperature=0.0,
                                detokenize=False, output_kind=OutputKind.DELTA)
        pending = deque(range(len(workload.prompts)))
        records: dict[int, RequestRecord] = {}
        in_flight = 0
        start = time.monotonic()
        while pending or engine.has_unfinished_requests():
            now = time.monotonic()
            while (pending and (not concurrency or in_flight < concurrency)
                   and start + workload.send_at[pending[0]] <= now):
                i = pending.popleft()
                engine.add_request(f"s{i}", workload.prompts[i], params)
                records[i] = RequestRecord(start=now)
                in_flight += 1
            if not engine.has_unfinished_requests():
                time.sleep(max(0.0, start + workload.send_at[pending[0]] - time.monotonic()))
                continue
            outputs = engine.step()
            now = time.monotonic()
            for out in outputs:
                record = records[int(out.request_id[1:])]
                tokens = out.outputs[0].token_ids
                if tokens:
                    record.chunk_times.append(now)
                    record.num_tokens += len(tokens)
                if out.finished:
                    in_flight -= 1
        return [records[i] for i in range(len(workload.prompts))]

    def describe(self) -> dict:
        e = self.engine
        return {"target": {"kind": "inprocess", "model": e.model_config.name,
                           "engine": e.config.settings_dict(), "num_kv_blocks": e.num_kv_blocks,
                           "device": str(e.device), "dtype": str(e.dtype)},
                "step_times": e.step_times.summary()}

    def close(self) -> None:
        pass
