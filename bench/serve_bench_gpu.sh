#!/usr/bin/env bash
# S1 on the GPU machine: Llama-3.1-8B (random weights) behind `taxiway serve` (four tiers, embedded
# Redis), driven by `taxiway bench serve` through gRPC and through the OpenAI endpoint at
# concurrency 1, 64, 256, 1024 (one client invocation) and a Poisson rate near saturation; then the
# same engine settings in-process (one engine for the four closed-loop points, one for Poisson).
# One JSON per target under $1 (serve-grpc.json, serve-openai.json, serve-inprocess.json), each
# run's figures inside.
#   bash bench/serve_bench_gpu.sh OUT_DIR
# Overrides (for a CPU smoke run): SB_ENGINE (engine flags), SB_ISL, SB_OSL, SB_SCALE (divides the
# request counts), SB_RATE (Poisson requests/s), SB_CLIENTS (client processes), SB_GATEWAYS
# (gateway processes sharing the ports: `--gateway-replicas`; the kernel spreads connections, not
# streams, so each gRPC client process opens SB_CONNECTIONS, default 4, e.g. SB_GATEWAYS=4
# SB_CLIENTS=16; the OpenAI client opens one connection per request).
# Through the stack each invocation also samples the tiers' /metrics every 0.5 s
# (bench/scrape_metrics.py, into NAME.metrics.json: the executor's step time and running batch, the
# scheduler's queue time, the first gateway's TTFT / ITL; SB_GATEWAY_METRICS_PORT, default 9091),
# and the executor's step times (per kind, as the in-process result has them) go from its log line
# at stop into executor-step-times.json. A part of the sweep: SB_TARGETS (default "grpc openai
# inprocess"; the stack starts only for grpc or openai), SB_POINTS (the closed-loop concurrencies, default "1 64 256 1024"; "" for none),
# SB_POISSON=0 (no Poisson run).
set -u
OUT=${1:?usage: serve_bench_gpu.sh OUT_DIR}
mkdir -p "$OUT"
ISL=${SB_ISL:-128} OSL=${SB_OSL:-128} SCALE=${SB_SCALE:-1} RATE=${SB_RATE:-100} CLIENTS=${SB_CLIENTS:-4}
CONNECTIONS=${SB_CONNECTIONS:-4}
read -r -a ENGINE <<< "${SB_ENGINE:---model llama-3.1-8b --load-format dummy --max-num-seqs 1024 --max-model-len $((ISL + OSL)) --gpu-memory-utilization 0.9 --no-enable-prefix-caching --admission-policy guaranteed_no_evict}"
GRPC_PORT=${SB_GRPC_PORT:-50051} OPENAI_PORT=${SB_OPENAI_PORT:-8000} GW_METRICS_PORT=${SB_GATEWAY_METRICS_PORT:-9091}
read -r -a POINTS <<< "${SB_POINTS-1 64 256 1024}"
TARGETS=" ${SB_TARGETS:-grpc openai inprocess} "
n() { echo $(( ($1 + SCALE - 1) / SCALE )); }
declare -A REQUESTS=([1]=32 [64]=256 [256]=1024 [1024]=2048)

bench() {  # bench TARGET NAME [args]: one `taxiway bench serve` invocation, JSON to $OUT/NAME.json
  local target=$1 name=$2 scraper= rc; shift 2
  if [ "$target" != inprocess ]; then  # the tiers' default metrics ports; the first gateway's
    python bench/scrape_metrics.py --url "gateway=http://127.0.0.1:$GW_METRICS_PORT/metrics" \
      --url tokenizer=http://127.0.0.1:9092/metrics --url scheduler=http://127.0.0.1:9093/metrics \
      --url executor=http://127.0.0.1:9094/metrics --out "$OUT/$name.metrics.json" &
    scraper=$!
  fi
  python -m taxiway.cli bench serve --target "$target" --isl "$ISL" --osl "$OSL" \
    --warmup-requests 16 --timeout-s 300 --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  if [ -n "$scraper" ]; then kill -TERM "$scraper"; wait "$scraper"; fi
  echo "$name rc=$rc $(python -c "import json,sys; r=json.load(open('$OUT/$name.json')); print(' '.join(f\"c={x['concurrency']} {x.get('output_tokens_per_s')} tok/s ttft_p50={x.get('ttft_ms',{}).get('p50')} err={x['errors']}\" for x in r['runs']))" 2>/dev/null)"
}

sweep() {  # sweep TARGET ADDRESS_ARGS...: the closed-loop points in one invocation, then Poisson
  local target=$1 counts=() c; shift
  [[ $TARGETS == *" $target "* ]] || return 0
  for c in "${POINTS[@]}"; do counts+=("$(n "${REQUESTS[$c]:-2048}")"); done
  if (( ${#POINTS[@]} )); then
    bench "$target" "serve-$target-closed" --concurrency "${POINTS[@]}" \
      --num-requests "${counts[@]}" --client-processes "$CLIENTS" "$@"
  fi
  if [ "${SB_POISSON:-1}" != 0 ]; then
    bench "$target" "serve-$target-poisson" --concurrency 0 --request-rate "$RATE" --num-requests "$(n 2048)" --client-processes "$CLIENTS" "$@"
  fi
}

t0=$SECONDS
if [[ $TARGETS == *" grpc "* || $TARGETS == *" openai "* ]]; then  # the stack
  python -m services.serve "${ENGINE[@]}" --port "$GRPC_PORT" --openai-port "$OPENAI_PORT" \
    --metrics-port "$GW_METRICS_PORT" --max-waiting 8192 --gateway-replicas "${SB_GATEWAYS:-1}" > "$OUT/serve-stack.log" 2>&1 &
  SERVER=$!
  until grep -q "taxiway is serving at" "$OUT/serve-stack.log"; do
    if ! kill -0 "$SERVER" 2>/dev/null || (( SECONDS - t0 > 300 )); then
      echo "taxiway serve did not get ready (see serve-stack.log)"; tail -n 20 "$OUT/serve-stack.log"; exit 1
    fi
    sleep 1
  done
  echo "stack ready in $((SECONDS - t0))s"
  sweep grpc --address "127.0.0.1:$GRPC_PORT" --connections "$CONNECTIONS"
  sweep openai --address "127.0.0.1:$OPENAI_PORT"
  kill -INT "$SERVER"; wait "$SERVER"
  echo "stack stopped at $((SECONDS - t0))s"
  grep -o ' step times: .*' "$OUT/serve-stack.log" | head -n 1 | cut -c 14- > "$OUT/executor-step-times.json"
fi
sweep inprocess "${ENGINE[@]}"
python - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
for target in ("grpc", "openai", "inprocess"):
    files = sorted(f for f in glob.glob(os.path.join(out, f"serve-{target}-*.json")) if not f.endswith(".metrics.json"))
    if not files:
        continue
    parts = [json.load(open(f)) for f in files]
    merged = {**parts[0], "runs": [r for p in parts for r in p["runs"]],
              "commands": [p.get("config") for p in parts]}
    with open(os.path.join(out, f"serve-{target}.json"), "w") as f:
        json.dump(merged, f, indent=1)
    print(target, [(r["concurrency"], r.get("output_tokens_per_s")) for r in merged["runs"]])
PY
echo "done in $((SECONDS - t0))s"
