"""`taxiway bench serve --target openai`: the workload as streamed /v1/completions calls (token-id
prompts, ignore_eos and min_tokens so that each gives exactly OSL tokens, return_token_ids so
that each chunk says its tokens, usage in the last chunk), each timed per SSE chunk like the gRPC
client.

The HTTP/1.1 framing is h11's (already installed with uvicorn) over asyncio streams, one
connection per request: a few dozen lines instead of an HTTP client dependency on the GPU machine,
and no client-side pooling or retries between the measurement and the server."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import urllib.request

import h11

from taxiway.serve_bench import RequestRecord, ServeBenchConfig, Workload, send_all


def _base(cfg: ServeBenchConfig) -> str:
    return f"{'https' if cfg.tls else 'http'}://{cfg.address}"


def _ssl(cfg: ServeBenchConfig) -> ssl.SSLContext | None:
    return ssl.create_default_context(cafile=cfg.ca_file) if cfg.tls else None


def _headers(cfg: ServeBenchConfig) -> dict:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


def model_info(cfg: ServeBenchConfig) -> dict:
    req = urllib.request.Request(_base(cfg) + "/v1/models", headers=_headers(cfg))
    with urllib.request.urlopen(req, timeout=30, context=_ssl(cfg)) as resp:
        card = json.loads(resp.read())["data"][0]
    if "vocab_size" not in card:
        raise ValueError(f"{_base(cfg)}/v1/models does not give vocab_size (not a taxiway "
                         "gateway?): the random token-id prompts need it")
    return {"name": card["id"], "vocab_size": card["vocab_size"],
            "max_context_length": card.get("max_model_len", 0)}


async def run(cfg: ServeBenchConfig, workload: Workload, concurrency: int,
              start: float) -> list[RequestRecord]:
    model = model_info(cfg)["name"]
    context = _ssl(cfg)

    async def send(prompt, record: RequestRecord) -> None:
        body = {"model": model, "prompt": prompt, "max_tokens": cfg.osl, "min_tokens": cfg.osl,
                "ignore_eos": True, "temperature": 0.0, "stream": True, "return_token_ids": True,
                "stream_options": {"include_usage": True}}
        await asyncio.wait_for(_stream(cfg, context, json.dumps(body).encode(), record), cfg.timeout_s)

    return await send_all(cfg, workload, concurrency, start, send,
                          (OSError, ValueError, asyncio.TimeoutError, h11.ProtocolError),
                          lambda exc: f"{type(exc).__name__}: {exc}")


async def _stream(cfg: ServeBenchConfig, context, body: bytes, record: RequestRecord) -> None:
    host, _, port = cfg.address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port), ssl=context)
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", cfg.address), ("Content-Type", "application/json"),
               ("Content-Length", str(len(body))), *_headers(cfg).items()]
    writer.write(conn.send(h11.Request(method="POST", target="/v1/completions", headers=headers)))
    writer.write(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
    await writer.drain()
    buffer = b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
                continue
            if isinstance(event, h11.Response) and event.status_code != 200:
                raise ValueError(f"HTTP {event.status_code}")
            if isinstance(event, h11.Data):
                buffer += bytes(event.data)
                *events, buffer = buffer.split(b"\n\n")
                for e in events:
                    _sse(e, record)
            if isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return
    finally:
        writer.close()


def _sse(event: bytes, record: RequestRecord) -> None:
    """One `data: {...}` event: a chunk with tokens (return_token_ids, vLLM's extra) times their
    arrival, as the gRPC client does; the usage at the end must agree."""
    if not event.startswith(b"data: ") or event == b"data: [DONE]":
        return
    chunk = json.loads(event[6:])
    if "error" in chunk:
        raise ValueError(chunk["error"].get("message", "error event"))
    tokens = sum(len(c.get("token_ids") or ()) for c in chunk.get("choices", ()))
    if tokens:
        record.chunk_times.append(time.monotonic())
        record.num_tokens += tokens
    usage = chunk.get("usage")
    if usage and usage["completion_tokens"] != record.num_tokens:
        raise ValueError(f"usage says {usage['completion_tokens']} tokens, the chunks held "
                         f"{record.num_tokens}")
