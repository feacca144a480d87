"""`taxiway bench serve --target grpc`: the workload as Generate streams over grpc.aio channels
(TLS and an API key when asked), each request timed per streamed chunk.

`connections` channels per client process, each its own TCP connection (a local subchannel pool:
channels to one address otherwise share one), take the streams in turn. One connection carries all
of a process's streams to one server, so behind gateway replicas on a shared port (SO_REUSEPORT
spreads connections, not streams) a few connections leave replicas idle."""

from __future__ import annotations

import contextlib
import itertools
import time
from pathlib import Path

from taxiway.serve_bench import RequestRecord, ServeBenchConfig, Workload, send_all


def _credentials(cfg: ServeBenchConfig):
    import grpc

    root = Path(cfg.ca_file).read_bytes() if cfg.ca_file else None
    return grpc.ssl_channel_credentials(root_certificates=root)


def _metadata(cfg: ServeBenchConfig) -> tuple:
    return (("authorization", f"Bearer {cfg.api_key}"),) if cfg.api_key else ()


def model_info(cfg: ServeBenchConfig) -> dict:
    import grpc

    from services.common.proto import Stub, pb

    channel = (grpc.secure_channel(cfg.address, _credentials(cfg)) if cfg.tls
               else grpc.insecure_channel(cfg.address))
    with channel:
        info = Stub(channel, "Gateway").GetModelInfo(pb.GetModelInfoRequest(), timeout=30,
                                                     metadata=_metadata(cfg))
    return {"name": info.name, "vocab_size": info.vocab_size,
            "max_context_length": info.max_context_length}


async def run(cfg: ServeBenchConfig, workload: Workload, concurrency: int,
              start: float) -> list[RequestRecord]:
    import grpc

    from services.common.proto import Stub, pb

    sampling = pb.SamplingParams(max_tokens=cfg.osl, min_tokens=cfg.osl, ignore_eos=True,
                                 temperature=0.0)
    metadata = _metadata(cfg)
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with contextlib.AsyncExitStack() as stack:
        stubs = []
        for _ in range(cfg.connections):
            channel = (grpc.aio.secure_channel(cfg.address, _credentials(cfg), options=options) if cfg.tls
                       else grpc.aio.insecure_channel(cfg.address, options=options))
            stubs.append(Stub(await stack.enter_async_context(channel), "Gateway"))
        turn = itertools.cycle(stubs)

        async def send(prompt, record: RequestRecord) -> None:
            if isinstance(prompt, str):
                request = pb.GenerateRequest(text=prompt, sampling=sampling)
            else:
                request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling)
            stub = next(turn)
            async for chunk in stub.Generate(request, timeout=cfg.timeout_s, metadata=metadata):
                if chunk.token_ids:
                    record.chunk_times.append(time.monotonic())
                    record.num_tokens += len(chunk.token_ids)

        return await send_all(cfg, workload, concurrency, start, send, (grpc.aio.AioRpcError,),
                              lambda exc: f"{exc.code().name}: {exc.details()}")
