"""The streaming engine API (add_request / step / abort) and its errors."""

import json

import pytest
from safetensors.torch import load_file, save_file

from gpu_engine.engine import LLMEngine
from gpu_engine.errors import InvalidRequest, ModelLoadError
from taxiway import LLM, OutputKind, SamplingParams
from tests.engine.hf import random_prompts

PROMPTS = random_prompts(4, 320, seed=7, lengths=[5, 20, 33, 9])


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(tiny_llama, num_kv_blocks=64, max_model_len=256)


def drain(engine, limit=500):
    outs = []
    for _ in range(limit):
        if not engine.has_unfinished_requests():
            return outs
        outs.extend(engine.step())
    raise AssertionError("engine did not finish")


@pytest.mark.parametrize("overlap", [False, True])
def test_delta_stream_adds_up_to_the_batch_result(llm, tiny_llama, overlap):
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]
    engine = LLM(tiny_llama, num_kv_blocks=64, max_model_len=256, async_scheduling=True).engine if overlap else llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"s{i}", p, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                                                      output_kind=OutputKind.DELTA))
    got = {f"s{i}": [] for i in range(len(PROMPTS))}
    finished = set()
    for out in drain(engine):
        assert len(out.outputs[0].token_ids) <= 1  # one token per step per sequence
        got[out.request_id] += out.outputs[0].token_ids
        if out.finished:
            assert out.outputs[0].finish_reason == "length"
            finished.add(out.request_id)
    assert finished == set(got)
    assert [got[f"s{i}"] for i in range(len(PROMPTS))] == want


def test_cumulative_outputs_grow_each_step(llm):
    engine = llm.engine
    engine.add_request("c", PROMPTS[0], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    lengths = [len(o.outputs[0].token_ids) for o in drain(engine)]
    assert lengths == [1, 2, 3, 4]


def test_abort_frees_blocks_at_once_and_reports_abort(llm):
    engine = llm.engine
    idle = engine.stats().num_free_blocks
    assert idle == engine.stats().num_total_blocks
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"a{i}", p, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    busy = engine.stats().num_free_blocks
    assert busy < idle
    [final] = engine.abort_request("a1")
    assert final.finished and final.outputs[0].finish_reason == "abort"
    assert len(final.outputs[0].token_ids) == 3
    assert engine.stats().num_free_blocks > busy
    assert engine.abort_request(["a0", "a2", "a3", "unknown"]) and not engine.has_unfinished_requests()
    assert engine.stats().num_free_blocks == idle
    assert engine.step() == []
    engine.block_manager.check_integrity()


def test_resume_from_prior_output_continues_exactly(llm):
    for params in (SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                   SamplingParams(max_tokens=12, temperature=1.0, seed=99, ignore_eos=True)):
        full = llm.generate(PROMPTS[1], params)[0].outputs[0].token_ids
        engine = llm.engine
        engine.add_request("resume", PROMPTS[1], params, prior_output_token_ids=full[:5])
        outs = drain(engine)
        assert outs[-1].outputs[0].token_ids == full[5:]


def test_stop_token_ids_and_min_tokens(llm):
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    first = llm.generate(PROMPTS[2], greedy)[0].outputs[0].token_ids[0]
    out = llm.generate(PROMPTS[2], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[first]))[0]
    assert out.outputs[0].token_ids == [first]
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", first)
    held = llm.generate(PROMPTS[2], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[first],
                                                   min_tokens=3))[0].outputs[0]
    assert first not in held.token_ids[:3] and len(held.token_ids) >= 3


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ([], SamplingParams(), "prompt is empty"),
        ([5] * 256, SamplingParams(), "context length is 256"),
        ([5] * 250, SamplingParams(max_tokens=10), "lower max_tokens to 6"),
        ([5, 999], SamplingParams(), "token id 999, outside the vocabulary"),
        ([5], SamplingParams(min_tokens=2, stop_token_ids=[10**9]),
         "stop_token_ids holds token id 1000000000, outside the vocabulary"),
        ("hello", SamplingParams(), "no tokenizer"),
        ([5], SamplingParams(stop=["x"]), "stop strings need detokenization"),
        (3.5, SamplingParams(), "string or a list of token ids"),
    ],
)
def test_invalid_requests_raise_clear_errors(llm, prompt, params, match):
    with pytest.raises(InvalidRequest, match=match):
        llm.engine.add_request("bad", prompt, params)
    assert not llm.engine.has_unfinished_requests()


def test_recover_after_a_failed_step_aborts_the_batch_and_the_engine_goes_on(tiny_llama):
    """A step that raises mid-way (after the plan took its blocks, as a sampler error would):
    recover() aborts the running batch, frees its blocks, keeps the waiting request, and the
    engine then serves exactly as before."""
    llm = LLM(tiny_llama, num_kv_blocks=64, max_model_len=256, max_num_seqs=2)
    engine = llm.engine
    params = SamplingParams(max_tokens=6, temperature=0.0, output_kind=OutputKind.DELTA)
    want = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=0.0))[0]
    for rid in ("a", "b", "waits"):
        engine.add_request(rid, PROMPTS[0], params)
    engine.step()
    collect = engine.runner.collect

    def broken(flight):
        raise IndexError("index 1000000000 is out of bounds")

    engine.runner.collect = broken
    with pytest.raises(IndexError):
        engine.step()
    engine.runner.collect = collect
    rec = engine.recover()
    assert rec.aborted == ("a", "b") and rec.integrity_error is None
    assert len(rec.batch) == 2 and rec.batch[0].startswith("a[0]: ")
    assert set(engine.requests) == {"waits"}
    tokens = [t for out in drain(engine) for t in out.outputs[0].token_ids]
    assert tokens == list(want.outputs[0].token_ids)
    assert engine.stats().num_free_blocks == 64
    engine.block_manager.check_integrity([])


def test_recover_reports_a_broken_block_pool(tiny_llama):
    engine = LLM(tiny_llama, num_kv_blocks=64, max_model_len=256).engine
    engine.add_request("a", PROMPTS[1], SamplingParams(max_tokens=4))
    engine.step()
    engine.block_manager.allocate(2)  # two blocks that no request holds
    rec = engine.recover()
    assert rec.aborted == ("a",)
    assert "2 blocks have reference counts that no block table accounts for" in rec.integrity_error


def test_duplicate_request_id_is_refused(llm):
    llm.engine.add_request("dup", [5, 6], SamplingParams(max_tokens=2))
    with pytest.raises(InvalidRequest, match="already running"):
        llm.engine.add_request("dup", [5, 6], SamplingParams(max_tokens=2))
    llm.engine.abort_request("dup")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"min_p": 2}, r"min_p must be in \[0, 1\]"),
        ({"n": 0}, "n must be at least 1"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"logprobs": 50}, "logprobs must be between 0 and 20"),
        ({"stop": [""]}, "stop strings must not be empty"),
        ({"temperature": float("inf")}, "temperature must be a finite number, got inf"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty must be a finite number"),
        ({"presence_penalty": float("-inf")}, "presence_penalty must be a finite number"),
        ({"top_p": float("nan")}, "top_p must be a finite number"),
        ({"stop": ["s"] * 17}, "at most 16 stop strings"),
        ({"stop": ["x" * 257]}, "at most 256 characters"),
        ({"stop_token_ids": list(range(257))}, "at most 256 stop_token_ids"),
        ({"stop_token_ids": [1.5]}, "stop_token_ids must be integer token ids"),
        ({"max_tokens": 2.5}, "max_tokens must be an integer"),
        ({"n": 129}, "at most 128"),
    ],
)
def test_invalid_sampling_params(kwargs, match):
    with pytest.raises(InvalidRequest, match=match):
        SamplingParams(**kwargs)


def test_unknown_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a folder nor a preset"):
        LLMEngine(model=str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        LLMEngine(model=str(tmp_path))
    with pytest.raises(ModelLoadError, match="load_format='dummy'"):
        LLMEngine(model="llama-3.1-8b")


def _copy_checkpoint(src, dst, edit):
    import shutil

    shutil.copytree(src, dst)
    tensors = load_file(f"{dst}/model.safetensors")
    edit(tensors)
    save_file(tensors, f"{dst}/model.safetensors", metadata={"format": "pt"})
    return str(dst)


def test_checkpoint_that_does_not_match_its_config_is_refused(tiny_llama, tmp_path):
    def wrong_shape(t):
        t["model.layers.1.mlp.up_proj.weight"] = t["model.layers.1.mlp.up_proj.weight"][:100]

    path = _copy_checkpoint(tiny_llama, tmp_path / "shape", wrong_shape)
    with pytest.raises(ModelLoadError, match=r"up_proj.weight' has shape \(100, 64\).*\(128, 64\)"):
        LLMEngine(model=path, num_kv_blocks=8, max_model_len=128)
    path = _copy_checkpoint(tiny_llama, tmp_path / "missing", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ModelLoadError, match="lacks tensors the config needs: model.norm.weight"):
        LLMEngine(model=path, num_kv_blocks=8, max_model_len=128)
    cfg = json.loads(open(f"{tiny_llama}/config.json").read())
    cfg["num_hidden_layers"] = 1
    path = _copy_checkpoint(tiny_llama, tmp_path / "extra", lambda t: None)
    open(f"{path}/config.json", "w").write(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="model.layers.1.* does not belong"):
        LLMEngine(model=path, num_kv_blocks=8, max_model_len=128)


def test_pickled_checkpoints_are_never_loaded(tiny_llama, tmp_path):
    import shutil

    shutil.copytree(tiny_llama, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickled checkpoints are never loaded"):
        LLMEngine(model=str(tmp_path / "m"), num_kv_blocks=8, max_model_len=128)


def test_sharded_checkpoint_loads_like_a_single_file(tiny_llama, tmp_path):
    tensors = load_file(f"{tiny_llama}/model.safetensors")
    names = sorted(tensors)
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text(open(f"{tiny_llama}/config.json").read())
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, folder / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    a = LLM(str(folder), num_kv_blocks=16, max_model_len=128).generate(PROMPTS[0], params)
    b = LLM(tiny_llama, num_kv_blocks=16, max_model_len=128).generate(PROMPTS[0], params)
    assert a[0].outputs[0].token_ids == b[0].outputs[0].token_ids


def test_dummy_weights_from_a_config_folder(tiny_llama):
    llm = LLM(tiny_llama, load_format="dummy", num_kv_blocks=16, max_model_len=128)
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3


def test_llm_is_sized_as_the_offline_class_and_the_engine_as_a_server(tiny_llama, monkeypatch):
    import gpu_engine.engine as engine_module

    asked = []
    real = engine_module.batch_limits
    monkeypatch.setattr(engine_module, "batch_limits",
                        lambda *args, offline=False: asked.append(offline) or real(*args, offline=offline))
    LLM(tiny_llama, load_format="dummy", num_kv_blocks=16, max_model_len=128)
    LLMEngine(model=tiny_llama, load_format="dummy", num_kv_blocks=16, max_model_len=128)
    assert asked == [True, False]


def test_kv_pool_smaller_than_the_context_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="lower max_model_len"):
        LLMEngine(model=tiny_llama, num_kv_blocks=4, max_model_len=256)


def test_async_engine_streams_aborts_and_stops_like_the_sync_one(tiny_llama):
    llm = LLM(tiny_llama, num_kv_blocks=64, max_model_len=256, async_scheduling=True)
    sync = LLM(tiny_llama, num_kv_blocks=64, max_model_len=256)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    first = sync.generate(PROMPTS[2], greedy)[0].outputs[0].token_ids[2]
    stop = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[first])
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, stop)] == [
        o.outputs[0].token_ids for o in sync.generate(PROMPTS, stop)]
    engine = llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"x{i}", p, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None
    finals = engine.abort_request([f"x{i}" for i in range(len(PROMPTS))])
    assert all(-1 not in f.outputs[0].token_ids for f in finals)
    assert all(f.outputs[0].finish_reason == "abort" for f in finals)
    while engine.has_unfinished_requests():
        assert engine.step() == []
    assert engine.stats().num_free_blocks == 64
    engine.block_manager.check_integrity()
