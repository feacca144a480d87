"""The wire contract, loaded at run time from protos/taxiway/v1/*.proto (no generated code in git).

protoc (from grpcio-tools) compiles the .proto files into a descriptor set once per process; the
message classes are built from it and the descriptors go into the default pool, so server
reflection serves them. Services are registered and called through generic handlers built from the
same descriptors:

    from services.common.proto import pb, add_service, Stub
    req = pb.GenerateRequest(text="hi")
    stub = Stub(channel, "Gateway")
"""

from __future__ import annotations

import functools
import importlib.resources
import inspect
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

def _proto_root() -> Path:
    """protos/ of the source tree, else the copy a non-editable install puts under
    <prefix>/share/taxiway/protos."""
    import sys

    for root in (Path(__file__).resolve().parents[2] / "protos",
                 Path(sys.prefix) / "share" / "taxiway" / "protos"):
        if (root / "taxiway" / "v1").is_dir():
            return root
    raise RuntimeError("protos/taxiway/v1 not found: run from a source checkout or `pip install .`")


PROTO_ROOT = _proto_root()
PACKAGE = "taxiway.v1"
PROTO_FILES = tuple(
    f"taxiway/v1/{name}.proto"
    for name in ("sampling", "gateway", "tokenizer", "streams", "executor", "scheduler")
)


def _compile() -> bytes:
    """Runs protoc over PROTO_FILES; returns a serialized FileDescriptorSet (imports included)."""
    from grpc_tools import protoc

    include = str(importlib.resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "taxiway.pb")
        args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--descriptor_set_out={out}",
                "--include_imports", *PROTO_FILES]
        if protoc.main(args) != 0 or not os.path.exists(out):
            raise RuntimeError(f"protoc failed on {PROTO_ROOT}; run it by hand: {' '.join(args)}")
        with open(out, "rb") as f:
            return f.read()


@functools.cache
def _load() -> SimpleNamespace:
    pool = descriptor_pool.Default()
    files = descriptor_pb2.FileDescriptorSet.FromString(_compile()).file
    for fdp in files:
        try:
            pool.FindFileByName(fdp.name)
        except KeyError:
            pool.AddSerializedFile(fdp.SerializeToString())
    ns = SimpleNamespace()
    for fdp in files:
        if fdp.package != PACKAGE:
            continue
        fd = pool.FindFileByName(fdp.name)
        for name, desc in fd.message_types_by_name.items():
            setattr(ns, name, message_factory.GetMessageClass(desc))
        for name, desc in fd.enum_types_by_name.items():
            setattr(ns, name, EnumTypeWrapper(desc))
            for value in desc.values:
                setattr(ns, value.name, value.number)
    return ns


class _LazyNamespace:
    """`pb.GenerateRequest` etc.; compiles the protos on first use, then holds every name as an
    attribute of its own (a lookup through __getattr__ cost 0.7 us: a third of building a
    GenerateResponse per streamed token)."""

    def __getattr__(self, name: str):
        ns = _load()
        self.__dict__.update(vars(ns))
        return getattr(ns, name)


pb = _LazyNamespace()


def service_descriptor(service: str):
    _load()
    return descriptor_pool.Default().FindServiceByName(f"{PACKAGE}.{service}")


def service_full_name(service: str) -> str:
    return f"{PACKAGE}.{service}"


def _classes(method) -> tuple[type, type]:
    return (message_factory.GetMessageClass(method.input_type),
            message_factory.GetMessageClass(method.output_type))


class _Oversize:
    """What a deserializer returns for a message over the server's request limit."""

    def __init__(self, size: int, limit: int):
        self.size, self.limit = size, limit

    def error(self):
        from services.common.errors import LimitExceeded

        return LimitExceeded(f"the request is {self.size} bytes; this server accepts at most "
                             f"{self.limit} (max_request_bytes): send a shorter prompt")


def _limited(parse, limit: int | None):
    if limit is None:
        return parse
    return lambda data: _Oversize(len(data), limit) if len(data) > limit else parse(data)


def _refusing_oversize(fn, client_streaming: bool):
    """The handler, raising LimitExceeded (RESOURCE_EXHAUSTED) for an oversize message."""
    def checked(items):
        for item in items:
            if isinstance(item, _Oversize):
                raise item.error()
            yield item

    def handler(request, context):
        if client_streaming:
            return fn(checked(request), context)
        if isinstance(request, _Oversize):
            raise request.error()
        return fn(request, context)

    return handler


def _aio_behavior(impl: object, name: str, client_streaming: bool, server_streaming: bool,
                  request_limit: int | None):
    """The handler of a grpc.aio server: a coroutine function, or an async generator function for
    a streaming response (what grpc.aio dispatches on), calling `impl.<name>` at each call (which
    returns a coroutine or an async generator)."""
    async def checked(items):
        async for item in items:
            if isinstance(item, _Oversize):
                raise item.error()
            yield item

    def request_of(request):
        if request_limit is None:
            return request
        if client_streaming:
            return checked(request)
        if isinstance(request, _Oversize):
            raise request.error()
        return request

    if server_streaming:
        async def stream(request, context):
            out = getattr(impl, name)(request_of(request), context)
            if inspect.isawaitable(out):  # a gate that refused the call raises here
                out = await out
            async for item in out:
                yield item

        return stream

    async def unary(request, context):
        return await getattr(impl, name)(request_of(request), context)

    return unary


def add_service(server: grpc.Server, service: str, impl: object, *,
                request_limit: int | None = None, aio: bool = False) -> None:
    """Registers `impl` (one method per RPC, named as in the .proto) as taxiway.v1.<service>.
    request_limit: messages over this many bytes are refused with RESOURCE_EXHAUSTED and a message
    that names the limit (the transport's own cap, above it, says less). aio: `server` is a
    grpc.aio server and impl's methods are coroutines / async generators."""
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    sd = service_descriptor(service)
    handlers = {}
    for m in sd.methods:
        req, resp = _classes(m)
        factory = factories[(m.client_streaming, m.server_streaming)]
        if aio:
            behavior = _aio_behavior(impl, m.name, m.client_streaming, m.server_streaming,
                                     request_limit)
        else:
            behavior = getattr(impl, m.name)
            if request_limit is not None:
                behavior = _refusing_oversize(behavior, m.client_streaming)
        handlers[m.name] = factory(behavior, request_deserializer=_limited(req.FromString, request_limit),
                                   response_serializer=resp.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(sd.full_name, handlers),))


class Stub:
    """A client of taxiway.v1.<service>: one callable attribute per RPC, as generated stubs have."""

    def __init__(self, channel: grpc.Channel, service: str):
        sd = service_descriptor(service)
        for m in sd.methods:
            req, resp = _classes(m)
            factory = {
                (False, False): channel.unary_unary,
                (False, True): channel.unary_stream,
                (True, False): channel.stream_unary,
                (True, True): channel.stream_stream,
            }[(m.client_streaming, m.server_streaming)]
            setattr(self, m.name, factory(f"/{sd.full_name}/{m.name}",
                                          request_serializer=req.SerializeToString,
                                          response_deserializer=resp.FromString))
