"""bench/profile_decode.py (a decode step's kernels at a benchmark's decode shape, issues 9 and 14)
on a tiny model on the CPU: the step really holds --seqs sequences of about --ctx tokens, the floor
counts the KV of the context the step reads, and kernels are grouped by name."""

import json

import pytest

from bench.profile_decode import group_of, main
from gpu_engine.config import ModelConfig


def test_profiles_the_asked_decode_shape(tiny_llama, tmp_path):
    out = tmp_path / "profile.json"
    assert main(["--model", tiny_llama, "--device", "cpu", "--seqs", "3", "--ctx", "40", "--steps", "2",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    c = ModelConfig.from_folder(tiny_llama)
    kv = 3 * 41 * 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4  # float32 on the CPU
    # The profiled step reads 41 tokens of each: the prompt's 39, the prefill's token and the token of
    # the step that collected it (one prefill step here, so no sequence decoded ahead of the others).
    assert r["context"] == {"mean": 41.0, "min": 41, "max": 41}
    assert r["floor"]["kv_gb"] == round(kv / 1e9, 3) and r["floor"]["weights_gb"] >= 0
    assert "floor_ms" not in r["floor"]  # no copy bandwidth off a GPU
    assert len(r["steps"]) == 2 and all(s["step_ms"] > 0 for s in r["steps"])
    assert r["config"]["seqs"] == 3 and r["machine"]["card"] == "cpu"


def test_a_pool_too_small_for_the_shape_is_an_error(tiny_llama, monkeypatch):
    import bench.profile_decode as P

    real = P.LLMEngine
    monkeypatch.setattr(P, "LLMEngine", lambda **kw: real(**kw, num_kv_blocks=8))
    with pytest.raises(SystemExit, match="sequences run, not 3"):
        main(["--model", tiny_llama, "--device", "cpu", "--seqs", "3", "--ctx", "64"])


@pytest.mark.parametrize(("kernel", "group"), [
    ("decode_split_kernel", "attention"), ("rope_and_write_kv_kernel", "rope_kv_write"),
    ("_rms_norm_kernel", "norm"), ("silu_and_mul_kernel", "activation"),
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopB_NNT", "gemm"), ("_fp8_mma_kernel", "gemm"),
    ("_fp8_gemv_kernel", "gemm"), ("_rms_norm_fp8_kernel", "norm"), ("_silu_and_mul_fp8_kernel", "activation"),
    ("_quantize_kernel", "act_quant"), ("_split_k_reduce_kernel", "gemm"), ("pivot_kernel", "sampling"),
    ("Memcpy HtoD (Pinned -> Device)", "copy"), ("mystery", "other"),
])
def test_kernels_are_grouped_by_name(kernel, group):
    assert group_of(kernel) == group
