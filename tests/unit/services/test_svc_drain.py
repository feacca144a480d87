"""Start-up and drain admission without a network: the Gate and GatedServicer, the scheduler
core's handling of a draining executor, and the settings the deploy files rely on."""

from __future__ import annotations

import threading

import pytest

from gpu_engine.errors import NotReady
from services.common.config import resolve
from services.common.drain import Gate, GatedServicer
from services.executor.config import ExecutorConfig
from services.serve import CONFIGS, role_configs, setting_names
from tests.unit.services.test_svc_scheduler_core import admits, core_with, req, state


class Servicer:
    def Unary(self, request, context):
        return request + 1

    def Stream(self, request, context):
        yield from range(request)


def test_gate_refuses_until_open_and_again_once_draining():
    gate = Gate("tokenizer")
    gated = GatedServicer(gate, always=("Unary",))
    with pytest.raises(NotReady, match="tokenizer is starting"):
        gated.Stream(2, None)  # no target yet: an always-method is gated too
    gated.target = Servicer()
    with pytest.raises(NotReady, match="tokenizer is starting"):
        gated.Stream(2, None)
    gate.open()
    stream = gated.Stream(3, None)
    assert gate.busy == 1  # counted from the call until the stream ends
    gate.close("draining")
    with pytest.raises(NotReady, match="tokenizer is draining"):
        gated.Stream(1, None)
    assert gated.Unary(1, None) == 2  # "always" methods still answer while draining
    assert not gate.wait_idle(0.05)
    assert list(stream) == [0, 1, 2]
    assert gate.busy == 0 and gate.wait_idle(0.0)


def test_gate_counts_unary_calls_and_failures_out_again():
    gate = Gate("gateway")

    class Failing:
        def Unary(self, request, context):
            raise ValueError("boom")

    gated = GatedServicer(gate, target=Failing())
    gate.open()
    with pytest.raises(ValueError):
        gated.Unary(1, None)
    assert gate.busy == 0


def test_wait_idle_stops_when_interrupted():
    gate = Gate("executor")
    gate.open()
    gate.enter()
    stop = threading.Event()
    stop.set()
    assert gate.wait_idle(30.0, stop) is False


def test_scheduler_requeues_what_a_draining_executor_refused_and_skips_it():
    core = core_with(("a", state("a")), ("b", state("b", free=50)))
    assert admits(core.submit(req("r1"), "1", 0.0)) == [("a", "r1")]
    # "a" refused it (it started draining before the scheduler heard): r1 waits, then goes to "b"
    assert admits(core.admit_refused("r1", "a")) == [("b", "r1")]
    assert admits(core.submit(req("r2"), "2", 0.0)) == [("b", "r2")]
    assert core.executors["a"].draining and not core.executors["a"].ready


def test_a_draining_state_stops_admission_for_good():
    core = core_with(("a", state("a")))
    core.executor_state(state("a", draining=True), 1.0)
    assert core.submit(req("r1"), "1", 1.0) == [] and core.num_waiting == 1
    assert core.num_requests == 1
    core.executor_state(state("a"), 2.0)  # a late state from before the drain changes nothing
    assert core.num_waiting == 1


def test_executor_takes_its_id_and_address_from_the_pod_environment():
    env = {"TAXIWAY_EXECUTOR_ID": "taxiway-executor-7d9f", "TAXIWAY_ADVERTISE_ADDRESS": "10.1.2.3:50054",
           "TAXIWAY_METRICS_PORT": "9200", "TAXIWAY_DRAIN_TIMEOUT_S": "125"}
    cfg = resolve(ExecutorConfig, "executor", env=env)
    assert cfg.resolved_id() == "taxiway-executor-7d9f"
    assert cfg.dial_address(bound_port=50054) == "10.1.2.3:50054"
    assert (cfg.metrics_port, cfg.drain_timeout_s) == (9200, 125.0)


def test_metrics_ports_by_role_and_serve_all_gives_the_flag_to_the_gateway_only():
    assert {r: c().metrics_port for r, c in CONFIGS.items()} == {
        "gateway": 9091, "tokenizer": 9092, "scheduler": 9093, "executor": 9094}
    assert {c().drain_timeout_s for c in CONFIGS.values()} == {30.0}
    known = setting_names()
    configs = role_configs({"metrics_port": 0}, {"TAXIWAY_METRICS_PORT": "1"},
                           {"executor": {"metrics_port": 9500}}, known)
    assert {r: c.metrics_port for r, c in configs.items()} == {
        "gateway": 0, "tokenizer": 9092, "scheduler": 9093, "executor": 9500}
    with pytest.raises(ValueError, match="metrics_port must be an integer"):
        ExecutorConfig(metrics_port=-1)
    with pytest.raises(ValueError, match="drain_timeout_s must be >= 0"):
        ExecutorConfig(drain_timeout_s=-1)
