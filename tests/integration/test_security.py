"""The fault suite, callers (issue 8, finding 4): API keys on the gateway, the internal credential
on every internal RPC, TLS on the public port, reflection configurable. Before, any caller that
reached a port could list, abort, admit or replace requests on an executor."""

from __future__ import annotations

import asyncio

import argparse

import grpc
import pytest
import redis
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common import streams
from services.common.auth import with_credential
from services.common.proto import Stub, pb
from tests.integration.faults import Stream, self_signed
from tests.integration.svc_stack import wait_for
from tests.integration.test_drain import health
from tests.integration.test_faults_requests import SERVING, rpc_error
from tests.integration.test_services_stack import echo, texts

pytestmark = pytest.mark.timeout(120)


def internal_calls(stack) -> dict:
    """One call per internal RPC, each taking a channel."""
    executor = streams.list_executors(redis.Redis.from_url(stack.redis_url))
    (info,) = executor.values()
    victim = pb.EngineRequest(request_id="victim", gateway_id="attacker", prompt_token_ids=[5, 6],
                              sampling=pb.SamplingParams(max_tokens=2))
    return {
        "Tokenizer/Tokenize": (f"127.0.0.1:{stack.tokenizer.port}", lambda ch: Stub(ch, "Tokenizer")
                               .Tokenize(pb.TokenizeRequest(text="x"), timeout=5)),
        "Tokenizer/Detokenize": (f"127.0.0.1:{stack.tokenizer.port}", lambda ch: Stub(ch, "Tokenizer")
                                 .Detokenize(iter([pb.DetokenizeRequest(
                                     setup=pb.DetokenizeSetup())]), timeout=5)),
        "Tokenizer/DetokenizeMany": (f"127.0.0.1:{stack.tokenizer.port}", lambda ch: Stub(ch, "Tokenizer")
                                     .DetokenizeMany(iter([pb.DetokenizeBatch()]), timeout=5)),
        "Scheduler/GetState": (stack.scheduler.server.address, lambda ch: Stub(ch, "Scheduler")
                               .GetState(pb.GetSchedulerStateRequest(), timeout=5)),
        "Executor/WatchState": (info["address"], lambda ch: next(Stub(ch, "Executor").WatchState(
            pb.WatchStateRequest(), timeout=5))),
        "Executor/Admit": (info["address"], lambda ch: Stub(ch, "Executor").Admit(
            pb.AdmitRequest(request=victim), timeout=5)),
        "Executor/Abort": (info["address"], lambda ch: Stub(ch, "Executor").Abort(
            pb.AbortRequest(request_ids=["victim"]), timeout=5)),
    }


def test_internal_rpcs_refuse_callers_without_the_credential(stack_factory):
    stack = stack_factory(fake_step_s=0.01)
    running = Stream.text(stack.stub, "a victim's request", 100)
    wait_for(lambda: running.chunks, 10, "the victim's stream")
    for name, (address, call) in internal_calls(stack).items():
        for secret in (None, "a-guessed-token"):
            with with_credential(grpc.insecure_channel(address), secret) as channel:
                err = rpc_error(lambda: call(channel))
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (name, secret, err)
                assert health(channel) == SERVING  # probes need no credential
    assert texts(running.result()) == echo("a victim's request", 100)  # untouched
    with with_credential(grpc.insecure_channel(stack.scheduler.server.address), None) as channel:
        assert rpc_error(lambda: Stub(channel, "Scheduler").GetState(
            pb.GetSchedulerStateRequest(), timeout=5)).details() == "missing credentials: send the " \
            "metadata `authorization: Bearer <API key>`"
    assert stack.state().is_leader  # with the credential (the stack's channel): answered


def test_a_wrong_or_missing_api_key_is_refused(stack_factory):
    stack = stack_factory(gateway_options={"api_keys": "team-a:sk-right-one"})
    request = pb.GenerateRequest(text="hello", sampling=pb.SamplingParams(max_tokens=5))
    for metadata in (None, (("authorization", "Bearer sk-wrong"),), (("authorization", "sk-right-one"),),
                     (("authorization", "Bearer sk-right-onf"),)):
        err = rpc_error(lambda: stack.stub.Generate(request, timeout=10, metadata=metadata))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
        assert "sk-" not in err.details()
    err = rpc_error(lambda: stack.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    good = (("authorization", "Bearer sk-right-one"),)
    assert texts(stack.stub.Generate(request, timeout=30, metadata=good)) == echo("hello", 5)
    assert health(stack.channel) == SERVING


def test_tls_on_the_gateway_with_the_grpc_client(stack_factory, tmp_path):
    from taxiway.commands.client import open_channel

    cert, key = self_signed(tmp_path)
    stack = stack_factory(gateway_options={"tls_cert_file": cert, "tls_key_file": key,
                                           "api_keys": "sk-tls"})
    address = f"127.0.0.1:{stack.gateway.server.port}"
    args = argparse.Namespace(address=address, tls=True, ca=cert, api_key="sk-tls")
    request = pb.GenerateRequest(text="over TLS", sampling=pb.SamplingParams(max_tokens=8))
    with open_channel(args) as channel:  # what `taxiway client --ca cert.pem` opens
        assert texts(Stub(channel, "Gateway").Generate(request, timeout=30)) == echo("over TLS", 8)
    with grpc.insecure_channel(address) as plain:
        err = rpc_error(lambda: Stub(plain, "Gateway").Generate(request, timeout=5))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
    (tmp_path / "other").mkdir()
    other_cert, _ = self_signed(tmp_path / "other")  # a CA that did not sign it
    with open_channel(argparse.Namespace(address=address, tls=True, ca=other_cert,
                                         api_key="sk-tls")) as wrong:
        err = rpc_error(lambda: Stub(wrong, "Gateway").Generate(request, timeout=5))
        assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_reflection_can_be_turned_off(stack_factory):
    stack = stack_factory(gateway_options={"allow_anonymous": True, "reflection": False})
    refl = reflection_pb2_grpc.ServerReflectionStub(stack.channel)
    err = rpc_error(lambda: next(refl.ServerReflectionInfo(iter([
        reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)))
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert texts(stack.generate("still serves", max_tokens=4)) == echo("still serves", 4)


def test_internal_tls_and_the_credential_between_gateway_and_tokenizer(tmp_path):
    from gpu_engine.errors import NotReady
    from services.gateway.clients import GrpcTokenizerClient
    from services.tokenizer.config import TokenizerConfig
    from services.tokenizer.service import build
    from tests.integration.svc_stack import INTERNAL_TOKEN

    cert, key = self_signed(tmp_path)
    tok = build(TokenizerConfig(port=0, metrics_port=0, fake_engine=True, reflection=False,
                                internal_token=INTERNAL_TOKEN, tls_cert_file=cert, tls_key_file=key))
    address = f"127.0.0.1:{tok.port}"

    async def calls():
        good = GrpcTokenizerClient(address, credential=INTERNAL_TOKEN, ca_file=cert)
        plain = GrpcTokenizerClient(address, credential=INTERNAL_TOKEN)
        no_credential = GrpcTokenizerClient(address, ca_file=cert)
        try:
            assert (await good.tokenize("ab"))[0] == [1, ord("a") + 3, ord("b") + 3]
            detok = await good.detokenizer([1], skip_special_tokens=True, stop=(),
                                           include_stop_str_in_output=False)
            assert await detok.add([ord("h") + 3, ord("i") + 3], flush=True) == ("hi", None)
            await detok.aclose()
            with pytest.raises(NotReady):
                await plain.tokenize("ab")
            with pytest.raises(Exception, match="refused this tier's internal credential"):
                await no_credential.tokenize("ab")
        finally:
            for client in (good, plain, no_credential):
                await client.close()

    try:
        asyncio.run(calls())
    finally:
        tok.stop()
