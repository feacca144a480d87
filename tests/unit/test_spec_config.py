"""speculative_config: vLLM's names, validated with errors that name the value; a flag and an
environment variable of the executor; the engine refuses it until the step loop runs it."""

from __future__ import annotations

import argparse

import pytest

from gpu_engine.config import EngineConfig
from gpu_engine.spec.config import SpeculativeConfig, parse_speculative_config
from services.common.config import parse_value
from taxiway.commands.engine_flags import add_engine_arguments, engine_kwargs


def test_vllm_names_and_defaults():
    c = parse_speculative_config({"method": "ngram", "num_speculative_tokens": 4})
    assert (c.prompt_lookup_min, c.prompt_lookup_max, c.disable_above_batch_size) == (2, 5, 32)
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2,
                                     "prompt_lookup_max": 3}).prompt_lookup_min == 3
    assert parse_speculative_config({"method": "ngram", "num_speculative_tokens": 2,
                                     "prompt_lookup_min": 4}).prompt_lookup_max == 4
    d = parse_speculative_config({"method": "eagle3", "num_speculative_tokens": 3, "model": "/heads/x",
                                  "disable_above_batch_size": 8})
    assert d == SpeculativeConfig("eagle3", 3, "/heads/x", None, None, 8)
    assert parse_speculative_config(None) is None
    assert EngineConfig(speculative_config={"method": "ngram", "num_speculative_tokens": 1}).speculative.method == "ngram"
    assert EngineConfig().speculative is None


@pytest.mark.parametrize("value, message", [
    ({"method": "medusa", "num_speculative_tokens": 2}, "method must be one of .*got 'medusa'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft": "x"}, r"unknown keys \['draft'\]"),
    ({"num_speculative_tokens": 2}, "needs 'method'"),
    ({"method": "ngram"}, "needs 'num_speculative_tokens'"),
    ({"method": "ngram", "num_speculative_tokens": 0}, r"num_speculative_tokens must be an integer in \[1, 16\], got 0"),
    ({"method": "ngram", "num_speculative_tokens": "3"}, "got '3'"),
    ({"method": "draft_model", "num_speculative_tokens": 3}, "needs 'model': a draft checkpoint folder"),
    ({"method": "eagle3", "num_speculative_tokens": 3}, "needs 'model': an EAGLE-3 head folder"),
    ({"method": "ngram", "num_speculative_tokens": 3, "model": "x"}, "takes no model"),
    ({"method": "eagle3", "num_speculative_tokens": 3, "model": "x", "prompt_lookup_max": 2},
     "prompt_lookup_max applies to method 'ngram' only"),
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 5, "prompt_lookup_max": 2},
     r"prompt_lookup_min \(5\) must not exceed prompt_lookup_max \(2\)"),
    ({"method": "ngram", "num_speculative_tokens": 3, "disable_above_batch_size": 0}, "positive integer, got 0"),
    ("ngram", "must be a JSON object"),
])
def test_bad_configs_are_named(value, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(speculative_config=value)


def test_a_json_flag_and_an_environment_variable():
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    assert EngineConfig(**engine_kwargs(args)).speculative.num_speculative_tokens == 3
    assert parse_value('{"method": "eagle3", "num_speculative_tokens": 2, "model": "/h"}', dict | None) == {
        "method": "eagle3", "num_speculative_tokens": 2, "model": "/h"}

