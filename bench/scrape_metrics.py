"""Sample the tiers' Prometheus /metrics while a benchmark runs: where a request's time goes per tier.

    python bench/scrape_metrics.py --url executor=http://127.0.0.1:9094/metrics \
        --url scheduler=http://127.0.0.1:9093/metrics --out metrics.json &
    ...the benchmark...
    kill -TERM $!          # or --duration-s; the summary is written on exit

Every `--interval-s` it reads each URL's `taxiway:` series (summed over label sets). On exit it
writes JSON: per tier, each histogram's count and mean over the window (its _sum and _count
deltas: the executor's step time, the scheduler's queue time, the gateway's TTFT and ITL), each
counter's increase, each gauge's mean and max over the samples (the executor's running batch),
and each sample's gauges. A URL that does not answer is counted in `unreachable`, never fatal.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def parse(text: str) -> dict[str, float]:
    """`taxiway:` samples of a Prometheus text page, summed over label sets (buckets left out)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("taxiway:") and not sample.name.endswith(("_bucket", "_created")):
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def _cumulative(name: str) -> bool:
    return name.endswith(("_sum", "_count", "_total"))


def summarize(samples: list[dict[str, float]]) -> dict:
    """Histograms (a _sum and a _count): count and mean over the window; counters (_total): the
    increase; anything else a gauge: mean and max over the samples."""
    if not samples:
        return {}
    first, last = samples[0], samples[-1]
    names = sorted(set().union(*samples))
    out: dict[str, dict] = {}
    for name in names:
        if name.endswith("_sum") and name[:-4] + "_count" in last:
            base = name[:-4]
            n = last.get(base + "_count", 0.0) - first.get(base + "_count", 0.0)
            s = last.get(name, 0.0) - first.get(name, 0.0)
            out[base] = {"count": n, "mean": s / n if n else None}
        elif name.endswith("_count") and name[:-6] + "_sum" in last:
            continue
        elif name.endswith("_total"):
            out[name] = {"increase": last.get(name, 0.0) - first.get(name, 0.0)}
        else:
            values = [s[name] for s in samples if name in s]
            out[name] = {"mean": sum(values) / len(values), "max": max(values)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", action="append", required=True, metavar="TIER=URL",
                    help="a tier's /metrics URL (repeatable)")
    ap.add_argument("--interval-s", type=float, default=0.5)
    ap.add_argument("--duration-s", type=float, default=None, help="stop after this long (default: at SIGTERM)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    urls = {}
    for item in args.url:
        tier, sep, url = item.partition("=")
        if not sep or not url:
            ap.error(f"--url takes TIER=URL, got {item!r}")
        urls[tier] = url
    stop = False

    def _stop(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    samples: dict[str, list] = {tier: [] for tier in urls}
    unreachable = dict.fromkeys(urls, 0)
    t0 = time.time()
    while not stop and (args.duration_s is None or time.time() - t0 < args.duration_s):
        for tier, url in urls.items():
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    page = parse(r.read().decode())
                samples[tier].append({"t": round(time.time() - t0, 3), **page})
            except OSError:
                unreachable[tier] += 1
        time.sleep(args.interval_s)
    result = {"benchmark": "tier_metrics", "interval_s": args.interval_s, "urls": urls,
              "unreachable": unreachable,
              "tiers": {tier: summarize([{k: v for k, v in s.items() if k != "t"} for s in rows])
                        for tier, rows in samples.items()},
              "samples": {tier: [{k: v for k, v in s.items() if not _cumulative(k)} for s in rows]
                          for tier, rows in samples.items()}}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
