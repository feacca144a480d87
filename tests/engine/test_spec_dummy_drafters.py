"""load_format="dummy" reaches the speculative drafters: a draft model's or an EAGLE-3 head's folder
with only config.json gets random weights (for benchmarks of a target with no checkpoint), and
speculation with them stays lossless; without dummy, such a folder is an error naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gpu_engine.config import ModelConfig
from gpu_engine.errors import ModelLoadError
from taxiway import LLM, SamplingParams
from tests.engine.spec_helpers import ALWAYS, generate_checked, head_config, tokens_of

PROMPTS = [[5, 9, 17, 3] * 4, [200, 201, 202] * 3, [7, 40, 41, 42, 43]]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def _config_only(tiny_llama: str, tmp_path: Path) -> dict[str, str]:
    draft = tmp_path / "draft"
    draft.mkdir()
    shutil.copy(Path(tiny_llama) / "config.json", draft / "config.json")
    head = tmp_path / "head"
    head.mkdir()
    (head / "config.json").write_text(json.dumps(head_config(ModelConfig.from_folder(tiny_llama), 100)))
    return {"draft_model": str(draft), "eagle3": str(head)}


def _llm(tiny_llama, spec=None, **kw):
    return LLM(tiny_llama, device="cpu", dtype="float32", num_kv_blocks=128, max_model_len=256,
               speculative_config=spec, **kw)


@pytest.mark.parametrize("method", ["draft_model", "eagle3"])
def test_dummy_drafters_are_random_and_lossless(tiny_llama, tmp_path, method):
    folder = _config_only(tiny_llama, tmp_path)[method]
    reference = tokens_of(_llm(tiny_llama, load_format="dummy").generate(PROMPTS, GREEDY))
    spec = {"method": method, "num_speculative_tokens": 3, "model": folder, **ALWAYS}
    llm = _llm(tiny_llama, spec, load_format="dummy")
    assert tokens_of(generate_checked(llm, PROMPTS, GREEDY)) == reference
    stats = llm.engine.scheduler.spec_stats
    assert stats.num_draft_tokens > 0
    if method == "draft_model":  # seeded apart from the target: not the target itself
        assert stats.num_accepted_tokens < stats.num_draft_tokens


@pytest.mark.parametrize("method", ["draft_model", "eagle3"])
def test_a_config_only_drafter_needs_dummy(tiny_llama, tmp_path, method):
    folder = _config_only(tiny_llama, tmp_path)[method]
    with pytest.raises(ModelLoadError, match=rf"no \*\.safetensors files in .*{Path(folder).name}"):
        _llm(tiny_llama, {"method": method, "num_speculative_tokens": 3, "model": folder})


REPO = Path(__file__).resolve().parents[2]


def test_bench_dummy_drafters_fit_the_8b_preset():
    """bench/data/dummy-drafters: a Llama-3.2-1B-shaped draft and an EAGLE-3 head for llama-3.1-8b."""
    from gpu_engine.spec.eagle3 import default_aux_layers, read_head_config

    target = ModelConfig.from_preset("llama-3.1-8b")
    data = REPO / "bench" / "data" / "dummy-drafters"
    draft = ModelConfig.from_folder(data / "llama-3.2-1b")
    assert (draft.vocab_size, draft.num_layers, draft.hidden_size, draft.head_dim) == (target.vocab_size, 16, 2048, 64)
    head = read_head_config(data / "eagle3-llama-3.1-8b", target)
    assert head.draft_vocab_size == 32000 and head.aux_layers == default_aux_layers(target.num_layers)


def test_spec_profile_runs_a_dummy_target_without_a_tokenizer(tiny_llama, tmp_path):
    from bench.spec_profile import main

    folders = _config_only(tiny_llama, tmp_path)
    out = tmp_path / "profile.json"
    assert main(["--model", tiny_llama, "--load-format", "dummy", "--device", "cpu", "--dtype", "float32",
                 "--draft-model", folders["draft_model"], "--eagle-head", folders["eagle3"], "--osl", "6",
                 "--max-model-len", "320", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["method"] for r in results] == ["none", "ngram-always", "draft_model-always", "eagle3-always", "eagle3"]
    assert all(r["output_tokens"] == 6 for r in results)
    assert results[2]["proposals"] > 0 and results[3]["proposals"] > 0
    assert all(r["after_first_ms_per_token"] > 0 for r in results)


def test_the_rate_after_the_first_token_leaves_the_prompts_step_out():
    from bench.spec_profile import _after_first

    assert _after_first([1.0, 1.010, 1.020, 1.040]) == 13.333  # 40 ms for the 3 tokens after the first
    assert _after_first([1.0, 1.0, 1.010, 1.010, 1.010]) == 3.333  # tokens sharing a step count each
    assert _after_first([]) is None and _after_first([2.0, 2.0]) is None
