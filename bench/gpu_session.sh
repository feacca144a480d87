#!/usr/bin/env bash
# One call on the GPU machine: tests, micro-benchmarks and engine benchmarks, phases chosen by name.
#   OUT=/tmp/out TAXIWAY_COMMIT=$(git rev-parse HEAD) bash bench/gpu_session.sh env kernel-tests engine-tests ...
# The step loop (issue 14), three calls of under 10 minutes each:
#   bash bench/gpu_session.sh sweep
#   bash bench/gpu_session.sh engine-tests
#   bash bench/gpu_session.sh t1-128 llm-128 t1-1000 cpu-step profile l1
# Every phase writes its log (and JSON) under $OUT and gets its own time limit; a summary comes last.
set -u
OUT=${OUT:-/tmp/taxiway-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$(pwd)
summary=()
# The api-defaults phases' model and workload (tests give a tiny model on the CPU).
API_DEFAULTS_ARGS=${API_DEFAULTS_ARGS:---model llama-3.1-8b --load-format dummy --dtype bfloat16 --isl 128 --osl 128 --num-requests 3000}

phase() {  # phase NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-20s rc=%-3s %4ss  %s' "$name" "$rc" $((SECONDS - t0)) "$(tail -n 1 "$OUT/$name.log" | cut -c1-90)")")
}

tp() {  # tp ISL OSL N [extra args]: one throughput run
  local isl=$1 osl=$2 n=$3; shift 3
  local id=${ID:-t1}-$isl-$osl${TAG:-}
  phase "$id" 580 python -m taxiway.cli bench throughput --isl "$isl" --osl "$osl" \
    --num-requests "$n" --out "$OUT/$id.json" "$@"
}

t3() {  # t3 NAME CONCURRENCY [extra args]: INT4 AWQ vs BF16 vs FP8 weights at a fixed concurrency
  local name=$1 c=$2; shift 2
  ID=t3-$name TAG=-c$c tp 1000 1000 $((4 * c)) --max-num-seqs "$c" "$@"
}

for step in "$@"; do
  case $step in
    env) phase env 60 bash -c 'nvidia-smi; python3 -c "import torch,triton,transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.get_device_name(0))"' ;;
    kernel-tests) phase kernel-tests 400 python -m pytest tests/kernels -q -m gpu -p no:cacheprovider ;;
    kernel-tests-all) phase kernel-tests-all 500 python -m pytest tests/kernels -q -x -p no:cacheprovider ;;
    engine-tests) phase engine-tests 500 python -m pytest tests/gpu -q -x -p no:cacheprovider ;;
    kernel-bench) phase kernel-bench 300 python bench/kernels.py --out "$OUT/kernels.json" ;;
    w4a16-tests) phase w4a16-tests 300 python -m pytest tests/kernels/test_kernels_w4a16.py -q -p no:cacheprovider ;;
    w4a16-bench) phase w4a16-bench 300 python bench/w4a16.py --out "$OUT/w4a16.json" ;;
    w4a16-sweep) phase w4a16-sweep 400 python bench/w4a16.py --sweep --out "$OUT/w4a16-sweep.json" ;;
    # Decode-sized W4A16 (issue 9): fast vs i2f unpacking and the tile sweep at M = 1, 4, 16, 64
    w4a16-decode) phase w4a16-decode 580 python bench/w4a16.py --ms 1 4 16 64 --sweep --out "$OUT/w4a16-decode.json" ;;
    sampling-tests) phase sampling-tests 500 python -m pytest tests/kernels/test_kernels_sampling.py tests/unit/test_sampler.py -q -p no:cacheprovider ;;
    sampling-table) phase sampling-table 450 python bench/sampling_throughput.py --out "$OUT/sampling-throughput.json" ;;
    sampling-bench) phase sampling-bench 550 python bench/sampling_kernels.py --out "$OUT/sampling-kernels.json" ;;
    # the decode attention's tiles at the T1 1000/1000 and T2 2048/2048 decode shapes (BF16 / FP8
    # KV, block sizes 16-64), with the KV bytes read per second (bench/kernels_sweep.py)
    attn-sweep-t1) phase attn-sweep-t1 560 python bench/kernels_sweep.py --only "ctx=1500" --out "$OUT/attn-sweep-t1.json" ;;
    attn-sweep-t2) phase attn-sweep-t2 560 python bench/kernels_sweep.py --only "ctx=3072" --out "$OUT/attn-sweep-t2.json" ;;
    attn-sweep-fp8) phase attn-sweep-fp8 400 python bench/kernels_sweep.py --only "ctx=3072 fp8" --out "$OUT/attn-sweep-fp8.json" ;;
    # V token-major (the FP8 cache's candidate layout) against the row-major cases of the same shapes
    attn-token-major) phase attn-token-major 400 python bench/kernels_sweep.py --only "token-major V" \
        --out "$OUT/attn-token-major.json" ;;
    attn-sweep-t1-b16) phase attn-sweep-t1-b16 300 python bench/kernels_sweep.py --only "b=330 ctx=1500" --skip block --out "$OUT/attn-sweep-t1-b16.json" ;;
    profile) phase profile 300 python bench/profile_step.py --out "$OUT/profile.json" ;;
    # one decode step's kernels at the throughput benchmarks' decode shapes (bench/profile_decode.py)
    profile-t1-1000) phase profile-t1-1000 300 python bench/profile_decode.py --seqs 331 --ctx 1500 --out "$OUT/profile-t1-1000.json" ;;
    profile-t2-1000) phase profile-t2-1000 300 python bench/profile_decode.py --seqs 497 --ctx 1500 \
        --quantization fp8 --kv-cache-dtype fp8 --out "$OUT/profile-t2-1000.json" ;;
    profile-t2-2048) phase profile-t2-2048 300 python bench/profile_decode.py --seqs 249 --ctx 3072 \
        --quantization fp8 --kv-cache-dtype fp8 --out "$OUT/profile-t2-2048.json" ;;
    # idle device time between a decode step's kernels in the running loop (bench/decode_gaps.py):
    # the ~11% by which kernel sums fell short of the steps' GPU time at T1's decode shapes
    decode-gaps-t1-128) phase decode-gaps-t1-128 300 python bench/decode_gaps.py --seqs 1800 --ctx 190 --steps 8 \
        --out "$OUT/decode-gaps-t1-128.json" ;;
    decode-gaps-t1-1000) phase decode-gaps-t1-1000 300 python bench/decode_gaps.py --seqs 331 --ctx 1500 --steps 8 \
        --out "$OUT/decode-gaps-t1-1000.json" ;;
    # two half-batches on two streams against one decode step (bench/overlap_probe.py)
    overlap-t1-128) phase overlap-t1-128 300 python bench/overlap_probe.py --seqs 1800 --ctx 190 \
        --out "$OUT/overlap-t1-128.json" ;;
    overlap-t1-1000) phase overlap-t1-1000 300 python bench/overlap_probe.py --seqs 331 --ctx 1500 \
        --out "$OUT/overlap-t1-1000.json" ;;
    overlap-t2-1000) phase overlap-t2-1000 300 python bench/overlap_probe.py --seqs 800 --ctx 1500 \
        --quantization fp8 --kv-cache-dtype fp8 --out "$OUT/overlap-t2-1000.json" ;;
    cpu-step) phase cpu-step 300 python bench/cpu_step.py --seqs 256 1024 2048 4096 --out "$OUT/cpu-step.json" ;;
    sweep) phase sweep 580 python -m taxiway.cli bench sweep --isl 128 --osl 128 --num-requests 4000 \
      --sizes 256 512 1024 2048 4096 --out "$OUT/sweep-128-128.json" ;;
    llm-128) phase llm-128 400 python -m taxiway.cli bench throughput --api llm --isl 128 --osl 128 \
      --num-requests 3000 --out "$OUT/llm-128-128.json" ;;
    # The public API on its defaults beside the bench on its settings, same workload, same call:
    # LLM(...).generate (prefix caching, max_utilization, the offline token budget, max_model_len of
    # the model) vs `taxiway bench throughput` (no prefix caching, guaranteed_no_evict, ISL + OSL),
    # Llama-3.1-8B dummy BF16, 3000 x 128/128, greedy, EOS ignored; one JSON each. api-defaults-8192
    # adds LLM.generate at the engine's 8192-token budget (the offline default's A/B):
    #   bash bench/gpu_session.sh api-defaults api-defaults-8192
    api-defaults) read -ra args <<<"$API_DEFAULTS_ARGS"
      phase api-defaults-llm 180 python -m taxiway.cli bench throughput --api llm "${args[@]}" --out "$OUT/api-defaults-llm.json"
      phase api-defaults-bench 180 python -m taxiway.cli bench throughput "${args[@]}" --out "$OUT/api-defaults-bench.json" ;;
    api-defaults-8192) read -ra args <<<"$API_DEFAULTS_ARGS"
      phase api-defaults-8192 180 python -m taxiway.cli bench throughput --api llm "${args[@]}" \
        --max-num-batched-tokens 8192 --out "$OUT/api-defaults-llm-8192.json" ;;
    t1-quick) tp 128 128 1000 ;;
    t1-quick-sync) TAG=-sync tp 128 128 1000 --no-async-scheduling ;;
    t1-128) tp 128 128 3000 ;;
    t1-1000) tp 1000 1000 1000 ;;
    t1-2048) tp 2048 2048 500 ;;
    l1) phase l1 300 python -m taxiway.cli bench latency --isl 128 --osl 256 --max-num-seqs 8 --out "$OUT/l1.json" ;;
    # FP8 W8A8 + FP8 KV (T2, L1 FP8): run each beside its BF16 phase in the same call.
    fp8-tests) phase fp8-tests 400 python -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_fp8.py tests/kernels/test_kernels_fp8_gemv.py tests/gpu/test_gpu_fp8.py -m gpu ;;
    fp8-gemm) phase fp8-gemm 500 python bench/fp8_gemm.py --out "$OUT/fp8-gemm.json" ;;
    # the small-M FP8 kernel (taxiway_kernels/fp8_gemv.py): all its tests on the GPU, then its tiles swept at
    # M = 1 and 16, two linears a call (each call under 10 minutes):
    #   bash bench/gpu_session.sh fp8-gemv-tests fp8-gemm-sweep-a;  bash bench/gpu_session.sh fp8-gemm-sweep-b
    fp8-gemv-tests) phase fp8-gemv-tests 300 python -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_fp8_gemv.py ;;
    fp8-gemm-sweep-a) phase fp8-gemm-sweep-a 560 python bench/fp8_gemm.py --ms 1 4 16 64 --sweep \
      --linears qkv_proj o_proj --out "$OUT/fp8-gemm-sweep-a.json" ;;
    fp8-gemm-sweep-b) phase fp8-gemm-sweep-b 560 python bench/fp8_gemm.py --ms 1 4 16 64 --sweep \
      --linears gate_up_proj down_proj --out "$OUT/fp8-gemm-sweep-b.json" ;;
    t2-128) ID=t2 tp 128 128 3000 --quantization fp8 --kv-cache-dtype fp8 ;;
    t2-1000) ID=t2 tp 1000 1000 1000 --quantization fp8 --kv-cache-dtype fp8 ;;
    t2-2048) ID=t2 tp 2048 2048 500 --quantization fp8 --kv-cache-dtype fp8 ;;
    # V token-major (v_cache_token_major; the FP8 decode without byte loads), beside the phases above
    t2-128-vt) ID=t2 TAG=-vt tp 128 128 3000 --quantization fp8 --kv-cache-dtype fp8 --v-cache-token-major ;;
    t2-1000-vt) ID=t2 TAG=-vt tp 1000 1000 1000 --quantization fp8 --kv-cache-dtype fp8 --v-cache-token-major ;;
    t2-2048-vt) ID=t2 TAG=-vt tp 2048 2048 500 --quantization fp8 --kv-cache-dtype fp8 --v-cache-token-major ;;
    # on a GPU these also check the alignment the token-major loads assert to the compiler (the
    # interpreter ignores it)
    # guaranteed_no_evict with the queue's tail admitted early (admission_tail_overcommit)
    t2-1000-tail) ID=t2 TAG=-tail tp 1000 1000 1000 --quantization fp8 --kv-cache-dtype fp8 --admission-tail-overcommit 0.1 ;;
    t2-2048-tail) ID=t2 TAG=-tail tp 2048 2048 500 --quantization fp8 --kv-cache-dtype fp8 --admission-tail-overcommit 0.1 ;;
    t1-1000-tail) TAG=-tail tp 1000 1000 1000 --admission-tail-overcommit 0.1 ;;
    token-major-tests) phase token-major-tests 400 python -m pytest -q -p no:cacheprovider \
        tests/kernels/test_v_cache_token_major_engine.py tests/kernels/test_kernels_fp8.py \
        tests/kernels/test_kernels_attention.py -k "token_major or llama_shapes" ;;
    l1-fp8) phase l1-fp8 300 python -m taxiway.cli bench latency --isl 128 --osl 256 --max-num-seqs 8 \
      --quantization fp8 --kv-cache-dtype fp8 --out "$OUT/l1-fp8.json" ;;
    # INT4 AWQ (W4A16): tests, L1 beside l1 / l1-fp8, and T3, throughput at 64 and 256 concurrent
    # requests (1000/1000, 4 x concurrency requests, KV in BF16 for all three) beside BF16 and FP8:
    #   bash bench/gpu_session.sh awq-tests l1 l1-fp8 l1-awq
    #   bash bench/gpu_session.sh t3-bf16-64 t3-fp8-64 t3-awq-64
    #   bash bench/gpu_session.sh t3-bf16-256 t3-fp8-256 t3-awq-256
    awq-tests) phase awq-tests 500 python -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_w4a16.py tests/kernels/test_kernels_w4a16_engine.py tests/gpu/test_gpu_awq.py ;;
    l1-awq) phase l1-awq 300 python -m taxiway.cli bench latency --isl 128 --osl 256 --max-num-seqs 8 \
      --quantization awq --out "$OUT/l1-awq.json" ;;
    t3-bf16-64) t3 bf16 64 ;;
    t3-bf16-256) t3 bf16 256 ;;
    t3-fp8-64) t3 fp8 64 --quantization fp8 ;;
    t3-fp8-256) t3 fp8 256 --quantization fp8 ;;
    t3-awq-64) t3 awq 64 --quantization awq ;;
    t3-awq-256) t3 awq 256 --quantization awq ;;
    quality) phase quality 400 python bench/quality.py --device cuda --dtype bfloat16 --out "$OUT/quality.json" ;;
    hf-128) phase hf-128 300 python bench/hf_baseline.py --isl 128 --osl 128 --num-requests 512 --out "$OUT/hf-128-128.json" ;;
    hf-1000) phase hf-1000 400 python bench/hf_baseline.py --isl 1000 --osl 1000 --num-requests 48 --out "$OUT/hf-1000-1000.json" ;;
    hf-2048) phase hf-2048 400 python bench/hf_baseline.py --isl 2048 --osl 2048 --num-requests 16 --out "$OUT/hf-2048-2048.json" ;;
    spec-tests) phase spec-tests 400 python -m pytest -q -x -p no:cacheprovider tests/gpu/test_spec_gpu.py tests/gpu/test_spec_engine_gpu.py tests/kernels/test_spec_proposers_triton.py ;;
    # batch-1 per method on the default model; eagle3 reads the head the train-draft phase wrote (run it
    # first), draft_model the draft make-draft wrote if it ran first:
    #   bash bench/gpu_session.sh train-draft make-draft spec-batch1 spec-verify-cost
    make-draft) phase make-draft 120 python bench/truncated_draft.py --layers 6 --out "$OUT/draft-smollm2-L6" ;;
    spec-batch1) args=(--eagle-head "$OUT/eagle3-smollm2")
      [ -d "$OUT/draft-smollm2-L6" ] && args+=(--draft-model "$OUT/draft-smollm2-L6")
      phase spec-batch1 560 python bench/spec_decode.py "${args[@]}" --out "$OUT/spec-batch1.json" ;;
    # where a speculative step's host time goes (bench/spec_profile.py), after train-draft / make-draft
    spec-profile) args=(--out "$OUT/spec-profile.json")
      [ -d "$OUT/eagle3-smollm2" ] && args+=(--eagle-head "$OUT/eagle3-smollm2")
      [ -d "$OUT/draft-smollm2-L6" ] && args+=(--draft-model "$OUT/draft-smollm2-L6")
      phase spec-profile 300 python bench/spec_profile.py "${args[@]}" --trace-dir "$OUT/traces" ;;
    # the same on Llama-3.1-8B dummy with a Llama-3.2-1B-shaped draft and an EAGLE-3 head, random
    # weights (bench/data/dummy-drafters: what drafting costs at 8B, no GGUF needed)
    spec-profile-8b) phase spec-profile-8b 400 python bench/spec_profile.py --model llama-3.1-8b --load-format dummy \
        --draft-model bench/data/dummy-drafters/llama-3.2-1b --eagle-head bench/data/dummy-drafters/eagle3-llama-3.1-8b \
        --max-model-len 2048 --out "$OUT/spec-profile-8b.json" --trace-dir "$OUT/traces-8b" ;;
    # verify step (k = 1..8 drafts) vs decode step, Llama-3.1-8B dummy, batch 1/8/32; the speedup is
    # projected from spec-batch1.json's acceptance lengths when that phase ran first
    spec-verify-cost) args=(--out "$OUT/spec-verify-cost.json")
      [ -f "$OUT/spec-batch1.json" ] && args+=(--acceptance "$OUT/spec-batch1.json")
      phase spec-verify-cost 300 python bench/spec_verify_cost.py "${args[@]}" ;;
    # 256 concurrent requests with and without n-gram speculation (the threshold must keep them within 3%)
    spec-tp256) phase tp256-none 300 python -m taxiway.cli bench throughput --isl 128 --osl 128 --num-requests 2000 \
        --max-num-seqs 256 --out "$OUT/tp256-none.json"
      phase spec-tp256 300 python -m taxiway.cli bench throughput --isl 128 --osl 128 --num-requests 2000 \
        --max-num-seqs 256 --speculative-config '{"method": "ngram", "num_speculative_tokens": 4}' --out "$OUT/spec-tp256.json" ;;
    serve-bench) phase serve-bench 560 bash bench/serve_bench_gpu.sh "$OUT" ;;
    # Tensor parallelism (issue 12), on a machine of 2 GPUs (nvidia-h200-x2), in one call:
    #   bash bench/gpu_session.sh tp-tests l1-tp1 l1-tp2 t1-1000 t1-1000-tp2
    tp-tests) phase tp-tests 500 python -m pytest -q -x -p no:cacheprovider tests/gpu/test_gpu_tensor_parallel.py tests/engine/test_tensor_parallel.py ;;
    l1-tp1) phase l1-tp1 300 python -m taxiway.cli bench latency --isl 128 --osl 256 --max-num-seqs 8 \
      --tensor-parallel-size 1 --out "$OUT/l1-tp1.json" ;;
    l1-tp2) phase l1-tp2 300 python -m taxiway.cli bench latency --isl 128 --osl 256 --max-num-seqs 8 \
      --tensor-parallel-size 2 --out "$OUT/l1-tp2.json" ;;
    t1-1000-tp2) TAG=-tp2 tp 1000 1000 1000 --tensor-parallel-size 2 ;;
    t1-128-tp2) TAG=-tp2 tp 128 128 3000 --tensor-parallel-size 2 ;;
    train-draft) phase train-draft 480 python -m taxiway.cli train-draft --out "$OUT/eagle3-smollm2" --no-progress ;;
    *) echo "unknown phase $step" ;;
  esac
done
echo "== summary"
printf '%s\n' "${summary[@]}"
