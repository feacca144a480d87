"""Prometheus metrics of the taxiway tiers, named and shaped as vLLM's `vllm:*` family is, with a
`taxiway:` prefix, so dashboards and alerts written for vLLM need only the prefix changed.

Each tier makes one bundle at start-up and serves its registry on its metrics port:

    metrics = GatewayMetrics(model_name="SmolLM2-135M-Instruct")   # own CollectorRegistry
    server = start_metrics_server(metrics.registry, port=9091)      # GET :9091/metrics
    metrics.time_to_first_token.observe(0.042)
    metrics.request_finished(prompt_tokens=12, generation_tokens=30, finished_reason="stop", e2e_s=1.3)
    server.close()

Every bundle makes its own CollectorRegistry unless given one, so several tier instances in one
process (tests) never collide. The four bundles define disjoint names, so the all-in-one mode may
pass one registry to all four and serve it once. Every series carries a `model_name` label.
Nothing here reads the environment or starts a thread until start_metrics_server is called. Making
a registry or a bundle turns off prometheus-client's `*_created` series for the whole process.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

PREFIX = "taxiway:"

# Seconds. Time to first token: from a few ms (prefix-cache hit, idle server) to minutes (queued).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
# Seconds between two streamed tokens; starts at 1 ms since a decode step can take under 5 ms.
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
               1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# Seconds, whole request as the client sees it.
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# Seconds waiting in the scheduler's queue: near zero when there is room, long under overload.
QUEUE_TIME_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                      40.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
# Seconds of one executor step (prefill chunks + decode of the running batch).
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
                0.25, 0.5, 1.0, 2.5, 5.0)
# Seconds of one tokenizer RPC.
TOKENIZER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                     0.5, 1.0)

# Label values of taxiway:request_success_total, created up front so rate() starts from zero.
FINISHED_REASONS = ("stop", "length", "abort")


def new_registry(process_metrics: bool = True) -> CollectorRegistry:
    """A fresh registry, with the process_*, python_info and python_gc_* collectors unless told not."""
    _no_created_series()
    registry = CollectorRegistry()
    if process_metrics:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def _no_created_series() -> None:
    # Drop the `*_created` series prometheus-client adds to every counter and histogram, as vLLM
    # does: they double the series count and no dashboard reads them. The switch is process-wide.
    disable_created_metrics()


def _registry(registry: CollectorRegistry | None) -> CollectorRegistry:
    _no_created_series()
    return new_registry() if registry is None else registry


def _per_model(registry: CollectorRegistry, model_name: str):
    """A maker of one model's metrics: make(kind, name, doc, **kw) is the Gauge / Counter /
    Histogram PREFIX + name in registry, its model_name label set."""

    def make(kind, name: str, doc: str, **kw):
        return kind(PREFIX + name, doc, ["model_name"], registry=registry, **kw).labels(model_name)

    return make


class GatewayMetrics:
    """What the client sees, measured where the stream leaves the gateway."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.model_name = model_name
        self.registry = _registry(registry)
        r, m = self.registry, ["model_name"]
        one = _per_model(r, model_name)
        self.time_to_first_token = one(Histogram, "time_to_first_token_seconds",
                                       "Request arrival to first streamed token, seconds.",
                                       buckets=TTFT_BUCKETS)
        self.inter_token_latency = one(Histogram, "inter_token_latency_seconds",
                                       "Time between two streamed tokens, seconds.", buckets=ITL_BUCKETS)
        self.e2e_request_latency = one(Histogram, "e2e_request_latency_seconds",
                                       "Request arrival to last token, seconds.",
                                       buckets=REQUEST_LATENCY_BUCKETS)
        self.prompt_tokens = one(Counter, "prompt_tokens", "Prompt tokens of finished requests.")
        self.generation_tokens = one(Counter, "generation_tokens", "Generated tokens of finished requests.")
        self.request_success = Counter(
            PREFIX + "request_success", "Requests that finished, by finish reason (stop, length, abort).",
            m + ["finished_reason"], registry=r)
        self.request_failure = Counter(
            PREFIX + "request_failure", "Requests that ended in an error, by gRPC status code name.",
            m + ["code"], registry=r)
        for reason in FINISHED_REASONS:
            self.request_success.labels(model_name, reason)

    def request_finished(self, *, prompt_tokens: int, generation_tokens: int, finished_reason: str,
                         e2e_s: float) -> None:
        """Count one request that ended normally ("stop", "length") or was aborted ("abort")."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generation_tokens)
        self.request_success.labels(self.model_name, finished_reason).inc()
        self.e2e_request_latency.observe(e2e_s)

    def request_failed(self, code: str) -> None:
        """Count one request that ended in an error; `code` is the gRPC status name, e.g.
        "RESOURCE_EXHAUSTED"."""
        self.request_failure.labels(self.model_name, code).inc()


class TokenizerMetrics:
    """Time spent per tokenizer RPC."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.model_name = model_name
        self.registry = _registry(registry)
        self.request_seconds = Histogram(
            PREFIX + "tokenizer_request_seconds", "Time to serve one tokenizer RPC, by method, seconds.",
            ["model_name", "method"], registry=self.registry, buckets=TOKENIZER_BUCKETS)

    def observe(self, method: str, seconds: float) -> None:
        """method: the RPC name, e.g. "Tokenize", "Detokenize"."""
        self.request_seconds.labels(self.model_name, method).observe(seconds)


class SchedulerMetrics:
    """The global waiting queue. Only the active scheduler sets these; a standby leaves them at 0."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.model_name = model_name
        self.registry = _registry(registry)
        one = _per_model(self.registry, model_name)
        self.num_requests_waiting = one(Gauge, "num_requests_waiting",
                                        "Requests waiting in the scheduler's queue.")
        self.request_queue_time = one(Histogram, "request_queue_time_seconds",
                                      "Time from enqueue to admission to an executor, seconds.",
                                      buckets=QUEUE_TIME_BUCKETS)
        self.num_executors = one(Gauge, "num_executors", "Live executors registered in Redis.")


def scheduler_is_leader_gauge(registry: CollectorRegistry) -> Gauge:
    """`taxiway:scheduler_is_leader`: 1 while this scheduler holds the leader lock and admits, 0
    while it stands by. Made at start-up, before the model is known (a standby never learns it),
    so it has no model_name label; each scheduler pod is its own scrape target."""
    _no_created_series()
    return Gauge(PREFIX + "scheduler_is_leader",
                 "1 while this scheduler holds the leader lock and admits, 0 on standby.",
                 registry=registry)


class ExecutorMetrics:
    """One executor's batch, KV cache and step loop."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.model_name = model_name
        self.registry = _registry(registry)
        r, m = self.registry, ["model_name"]
        one = _per_model(r, model_name)
        self.num_requests_running = one(Gauge, "num_requests_running",
                                        "Requests in this executor's running batch.")
        self.kv_cache_usage = one(Gauge, "kv_cache_usage_perc",
                                  "Fraction of KV-cache blocks in use, 0 to 1 (1 = full).")
        self.prefix_cache_queries = one(Counter, "prefix_cache_queries",
                                        "Prompt tokens looked up in the prefix cache.")
        self.prefix_cache_hits = one(Counter, "prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.num_preemptions = one(Counter, "num_preemptions",
                                   "Requests preempted because KV blocks ran out.")
        self.kernel_compiles_after_start = one(
            Counter, "kernel_compiles_after_start",
            "Triton kernel specialisations compiled after the engine's start-up warm-up (each one "
            "stalled the running batch for its compile).")
        self.step_seconds = one(Histogram, "executor_step_seconds",
                                "Duration of one executor step, seconds.", buckets=STEP_BUCKETS)
        # Speculative decoding, as vLLM names it (spec_decode_*).
        self.spec_decode_num_drafts = one(Counter, "spec_decode_num_drafts",
                                          "Verify entries run (one per speculating request and step).")
        self.spec_decode_num_draft_tokens = one(Counter, "spec_decode_num_draft_tokens",
                                                "Drafted tokens verified.")
        self.spec_decode_num_accepted_tokens = one(Counter, "spec_decode_num_accepted_tokens",
                                                   "Drafted tokens accepted.")
        self._accepted_per_pos = Counter(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos",
            "Accepted drafted tokens by their position in the draft (0-based).",
            m + ["position"], registry=r)

    def spec_decode(self, drafts: int, draft_tokens: int, accepted: int, accepted_per_pos) -> None:
        """Count verify entries and their drafted / accepted tokens (accepted_per_pos[j]: how many
        accepted drafts sat at position j)."""
        self.spec_decode_num_drafts.inc(drafts)
        self.spec_decode_num_draft_tokens.inc(draft_tokens)
        self.spec_decode_num_accepted_tokens.inc(accepted)
        for j, n in enumerate(accepted_per_pos):
            self._accepted_per_pos.labels(self.model_name, str(j)).inc(n)

    def prefix_cache_lookup(self, queried_tokens: int, hit_tokens: int) -> None:
        """Count one prefix-cache lookup; hit rate = rate(hits) / rate(queries)."""
        self.prefix_cache_queries.inc(queried_tokens)
        self.prefix_cache_hits.inc(hit_tokens)


@dataclass
class MetricsServer:
    """A running /metrics endpoint; `port` is the bound one (useful with port=0)."""

    httpd: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.httpd.server_port

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> MetricsServer:
    """Serve `registry` in the Prometheus text format on http://addr:port/metrics from a daemon
    thread (any path answers; Prometheus scrapes /metrics). prometheus-client's own server, except
    that its loop looks for close() every 0.1 s instead of every 0.5 s: a tier stops faster."""
    family, *_, sockaddr = socket.getaddrinfo(addr, port)[0]  # IPv4 or IPv6, as addr is
    server_cls = type("MetricsHTTPServer", (ThreadingWSGIServer,), {"address_family": family})
    try:
        httpd = make_server(sockaddr[0], port, make_wsgi_app(registry), server_cls,
                            handler_class=_QuietHandler)
    except OSError as exc:
        raise OSError(f"cannot listen on {addr}:{port} (metrics_port): {exc.strerror}") from None
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                              name="metrics-http", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        """No access log line per scrape."""
