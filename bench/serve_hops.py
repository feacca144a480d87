"""Where time to first token goes between the tiers: one request at a time through all four tiers
(each its own gRPC server, in this process, as tests/integration/svc_stack.py builds them; a real
embedded Redis; the fake engine), every tier tracing into memory; each hop's median from the
spans (docs/observability.md: Generate, enqueue, admit, execute, prefill).

    python bench/serve_hops.py --requests 40 --out bench/results/serve_hops_cpu_X.json

Hops, in order (ms), each from the start of one span to the next (they add up to the TTFT):
client_to_gateway (the client sends -> the Generate handler runs), gateway_intake (-> the XADD
starts: validation, model info, the Detokenize stream opened), enqueue_to_admitted (the XADD, the
scheduler's XREADGROUP waking, its decision), admit_rpc (admitted -> the executor holds it),
engine_first_token (admission -> the first token: wake-up, the fake step, prefill), to_client
(first token -> the client has it: publish, XREAD, detokenize, gRPC write).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.common.proto import pb  # noqa: E402
from services.common.redis_server import EmbeddedRedis  # noqa: E402
from services.common.telemetry import in_memory_tracing  # noqa: E402
from taxiway.benchmarks import machine_info, write_result  # noqa: E402
from tests.integration.svc_stack import Stack  # noqa: E402

ROLES = ("gateway", "tokenizer", "scheduler", "executor")
HOPS = ("client_to_gateway", "gateway_intake", "enqueue_to_admitted", "admit_rpc",
        "engine_first_token", "to_client")


def one_request(stack: Stack, prompt: list[int]) -> tuple[float, float]:
    """(sent, first chunk) as Unix times (the spans' clock)."""
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                             sampling=pb.SamplingParams(max_tokens=2, temperature=0.0))
    sent = time.time()
    first = None
    for chunk in stack.stub.Generate(req, timeout=30):
        if first is None and chunk.token_ids:
            first = time.time()
    return sent, first


def hops_of(spans: dict[str, list], sent_s: float, first_token_s: float) -> dict[str, float]:
    """Each hop's length (ms) in one request's spans (name -> spans, one trace)."""
    def one(name):
        return spans[name][0]

    gen, enq, admit = one("Generate"), one("enqueue"), one("admit")  # admit starts at the entry's id time
    execute, prefill = one("execute"), one("prefill")
    ms = 1e-6  # span times are ns
    return {
        "client_to_gateway": gen.start_time * ms - sent_s * 1e3,
        "gateway_intake": (enq.start_time - gen.start_time) * ms,
        "enqueue_to_admitted": (admit.end_time - enq.start_time) * ms,
        "admit_rpc": (execute.start_time - admit.end_time) * ms,
        "engine_first_token": (prefill.end_time - execute.start_time) * ms,
        "to_client": first_token_s * 1e3 - prefill.end_time * ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=40, help="measured requests, one at a time")
    ap.add_argument("--step-ms", type=float, default=1.0, help="the fake engine's step time")
    ap.add_argument("--label", default="", help="a note stored in the JSON (e.g. before/after)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default: bench/results/serve_hops_cpu_<time>.json)")
    args = ap.parse_args()
    tracing = {role: in_memory_tracing(f"taxiway-{role}") for role in ROLES}
    redis_server = EmbeddedRedis()
    stack = Stack(redis_server.url, fake_step_s=args.step_ms / 1e3,
                  tracer_providers={role: p for role, (p, _) in tracing.items()})
    try:
        stack.start()
        prompt = list(range(10, 42))
        for _ in range(5):  # warm-up
            one_request(stack, prompt)
        time.sleep(0.5)  # the warm-up's last spans end
        for _, exporter in tracing.values():
            exporter.clear()
        times, ttft = [], []
        for _ in range(args.requests):
            sent, first = one_request(stack, prompt)
            times.append((sent, first))
            ttft.append((first - sent) * 1e3)
        time.sleep(0.5)
        by_trace: dict[int, dict[str, list]] = {}
        for _, exporter in tracing.values():
            for span in exporter.get_finished_spans():
                by_trace.setdefault(span.context.trace_id, {}).setdefault(span.name, []).append(span)
        traces = sorted(by_trace.values(), key=lambda t: t["Generate"][0].start_time)
        per_hop = {h: [] for h in HOPS}
        for spans, (sent, first) in zip(traces, times):
            for hop, value in hops_of(spans, sent, first).items():
                per_hop[hop].append(value)
    finally:
        stack.stop()
        redis_server.stop()
    result = {
        "bench": "serve_hops", "label": args.label, "machine": machine_info(),
        "config": {"requests": args.requests, "fake_step_ms": args.step_ms},
        "ttft_ms_p50": round(statistics.median(ttft), 3),
        "hops_ms_p50": {h: round(statistics.median(v), 3) for h, v in per_hop.items()},
    }
    result["hops_sum_ms"] = round(sum(result["hops_ms_p50"].values()), 3)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    write_result(result, args.out or str(ROOT / "bench" / "results" / f"serve_hops_cpu_{stamp}.json"))


if __name__ == "__main__":
    main()
