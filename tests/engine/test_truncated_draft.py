"""bench/truncated_draft.py: the first L layers of a target make a draft model that loads as
method draft_model and leaves greedy output unchanged."""

import json
from pathlib import Path

from safetensors import safe_open

from bench.truncated_draft import truncate
from taxiway import LLM, SamplingParams


def test_truncated_draft_keeps_the_first_layers_and_decodes_exactly(tiny_llama, tmp_path):
    out = tmp_path / "draft"
    truncate(Path(tiny_llama), out, 1)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    with safe_open(str(out / "model.safetensors"), framework="pt") as sf:
        names = set(sf.keys())
    assert any(n.startswith("model.layers.0.") for n in names)
    assert not any(n.startswith("model.layers.1.") for n in names)
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names

    prompt = [[5, 9, 17, 3, 88, 41, 7, 120, 33, 2]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    plain = LLM(tiny_llama, device="cpu", num_kv_blocks=64).generate(prompt, params)[0].outputs[0].token_ids
    spec = LLM(tiny_llama, device="cpu", num_kv_blocks=64,
               speculative_config={"method": "draft_model", "num_speculative_tokens": 3, "model": str(out),
                                   "disable_when_slower": False})
    got = spec.generate(prompt, params)[0]
    assert got.outputs[0].token_ids == plain
    assert got.num_draft_tokens > 0
