"""The fault suite, the tokenizer tier (issue 8, finding 6): two tokenizer replicas behind one
target, the one that holds the gateway's DetokenizeMany stream killed (-9) mid-stream. The gateway
opens every request's detokenizer session again on the other replica from the tokens it has: the
text has no gap and no duplicate. Before, every stream in flight ended with UNAVAILABLE."""

from __future__ import annotations

import time

import pytest

from services.common.redis_server import free_port
from services.tokenizer.config import TokenizerConfig
from services.tokenizer.service import build as build_tokenizer
from tests.integration.faults import Stream, lost_and_duplicated, recovery_s
from tests.integration.svc_stack import INTERNAL_TOKEN, Stack, internal_channel, wait_for
from tests.integration.test_drain import health
from tests.integration.test_faults_requests import SERVING
from tests.integration.test_services_stack import echo

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


def test_a_tokenizer_replica_killed_mid_stream(redis_url, fault_report):
    first, second = free_port(), free_port()
    stack = Stack(redis_url, fake_step_s=0.02,
                  tokenizer_address=f"ipv4:127.0.0.1:{first},127.0.0.1:{second}")
    victim = None
    try:
        victim = stack_spawn_tokenizer(stack, first)
        stack.start()
        prompts = [f"detokenized on the replica that dies, {i} 😀 é" for i in range(3)]
        n = len(prompts[0].encode()) * 3
        streams = [Stream.text(stack.stub, p, n) for p in prompts]  # all on `first`: the only one
        wait_for(lambda: all(len(s.chunks) >= 5 for s in streams), 20, "every stream to start")
        survivor = build_tokenizer(TokenizerConfig(port=second, metrics_port=0, fake_engine=True,
                                                   internal_token=INTERNAL_TOKEN))
        time.sleep(1.5)  # the gateway's channel reconnects within its 1 s backoff
        fault_at = time.monotonic()
        victim.kill()
        victim.wait()
        for s, p in zip(streams, prompts):
            s.result(60)
            assert s.output == echo(p, n), s.output
        served = survivor.obs.registry.get_sample_value(
            "taxiway:tokenizer_request_seconds_count",
            {"model_name": "fake-bytes", "method": "Detokenize"})
        assert served and served >= 3  # the reopened streams ran there
        # the reopened sessions share one stream there (the gateway's, kept open for later requests)
        wait_for(lambda: survivor.gate.busy == 1, 5, "one DetokenizeMany stream")
        lost = dup = 0
        for s, p in zip(streams, prompts):
            a, b = lost_and_duplicated(echo(p, n), s.output)
            lost, dup = lost + a, dup + b
        fault_report(fault="tokenizer replica killed (-9), 2 replicas", streams=3, lost=lost,
                     duplicated=dup, recover_s=recovery_s(streams, fault_at),
                     note="every detokenizer session reopened on the other replica; text exact")
        survivor.stop()
    finally:
        stack.stop()


def stack_spawn_tokenizer(stack: Stack, port: int):
    proc = stack.spawn_tokenizer(port)
    with internal_channel(f"127.0.0.1:{port}") as channel:
        wait_for(lambda: _serving(channel), 30, "the tokenizer replica")
    return proc


def _serving(channel) -> bool:
    try:
        return health(channel) == SERVING
    except Exception:  # noqa: BLE001 - not listening yet
        return False
