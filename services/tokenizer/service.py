"""The tokenizer tier's gRPC shell: taxiway.v1.Tokenizer over TokenizerCore."""

from __future__ import annotations

import logging

from gpu_engine.errors import InvalidRequest
from services.common import convert, hooks
from services.common.proto import pb
from services.common.server import GrpcServer, LazyServicer
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.core import TokenizerCore, load_core

log = logging.getLogger(__name__)


class TokenizerServicer:
    def __init__(self, core: TokenizerCore):
        self.core = core

    def Tokenize(self, request, context):
        with hooks.span("tokenizer.tokenize", _traceparent(context)):
            ids, text = self.core.tokenize(**convert.tokenize_request_from_pb(request))
        return pb.TokenizeResponse(token_ids=ids, text=text)

    def Detokenize(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "setup":
            raise InvalidRequest("the first Detokenize message must be a setup")
        detok = self.core.detokenizer(**convert.detokenize_setup_from_pb(first.setup))
        with hooks.span("tokenizer.detokenize", _traceparent(context)):
            for msg in request_iterator:
                text, stop = detok.add(msg.tokens.ids, flush=msg.flush)
                yield pb.DetokenizeResponse(new_text=text, stop=stop or "")

    def GetModelInfo(self, request, context):
        return convert.model_info_to_pb(self.core.info)


def _traceparent(context) -> str:
    return hooks.traceparent_from_metadata(context.invocation_metadata())


def build(config: TokenizerConfig, core: TokenizerCore | None = None) -> GrpcServer:
    """A started server, NOT_SERVING while the tokenizer loads, then SERVING."""
    lazy = LazyServicer("tokenizer is still loading")
    server = GrpcServer(config.host, config.port, {"Tokenizer": lazy},
                        max_workers=config.max_workers).start()
    core = core or load_core(config)
    lazy.target = TokenizerServicer(core)
    server.set_serving(True)
    log.info("tokenizer tier serving %s on %s", core.info.name, server.address)
    return server
