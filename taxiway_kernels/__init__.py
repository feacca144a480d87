"""GPU kernels, each with a checked wrapper, a plain-torch reference and tests.

Importing this package needs neither triton nor a GPU. The Triton kernels live in submodules that
callers import when they run on the GPU:

    taxiway_kernels.reference         plain-torch references (the CPU engine runs these)
    taxiway_kernels.triton_attention  paged_attention, paged_decode_attention, paged_prefill_attention
    taxiway_kernels.rotary            rope_and_write_kv
    taxiway_kernels.norm              rms_norm, fused_add_rms_norm (and their *_quant_fp8 variants)
    taxiway_kernels.activation        silu_and_mul (and silu_and_mul_quant_fp8)
    taxiway_kernels.fp8               quantize_fp8 (E4M3 per token or static); norm/activation have FP8 variants
    taxiway_kernels.fp8_gemm          fp8_linear: torch._scaled_mm with rowwise scales (no triton at import);
                                      M <= 64 on CUDA sm_89+ goes to taxiway_kernels.fp8_gemv
    taxiway_kernels.fp8_gemv          fp8_linear_small_m: the small-M FP8 GEMM (FP8 MMA on y.T = W x.T, split-K)
    taxiway_kernels.w4a16             w4a16_linear (INT4 weights x 16-bit activations), dequantize
    taxiway_kernels.w4a16_reference   the W4A16 weight layout and its plain-torch reference (no triton)
    taxiway_kernels.testing           random paged batches for tests and benchmarks (no triton)

Not named `kernels`: that is Hugging Face's `kernels` distribution (transformers 5.25 requires it),
and two top-level packages of one name shadow each other, whichever sys.path finds first.
"""
