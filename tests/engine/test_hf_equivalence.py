"""Greedy outputs equal HF transformers' token for token (float32, CPU); logprobs within 1e-4."""

import pytest
import torch

from taxiway import LLM, SamplingParams
from tests.engine.hf import hf_greedy, random_prompts

MAX_NEW = 10


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    import transformers

    refs = {}
    for arch, path in tiny_checkpoints.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        prompts = random_prompts(12, 320, seed=len(refs), lengths=[1, 2, 5, 9, 16, 17, 31, 33, 48, 64, 100, 130])
        refs[arch] = (prompts, [hf_greedy(model, p, MAX_NEW) for p in prompts])
    return refs


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_batched_greedy_equals_hf(arch, tiny_checkpoints, references):
    prompts, refs = references[arch]
    llm = LLM(tiny_checkpoints[arch], num_kv_blocks=256, max_model_len=512)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True, logprobs=0)
    outs = llm.generate(prompts, params)
    for out, (want_tokens, want_lps) in zip(outs, refs):
        got = out.outputs[0]
        assert got.token_ids == want_tokens
        got_lps = [lp[t] for lp, t in zip(got.logprobs, got.token_ids)]
        assert max(abs(a - b) for a, b in zip(got_lps, want_lps)) < 1e-4
    llm.engine.block_manager.check_integrity()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_one_at_a_time_equals_hf(arch, tiny_checkpoints, references):
    prompts, refs = references[arch]
    llm = LLM(tiny_checkpoints[arch], num_kv_blocks=64, max_model_len=512, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    for prompt, (want, _) in zip(prompts, refs):
        assert llm.generate(prompt, params)[0].outputs[0].token_ids == want


def test_prompt_logprobs_equal_hf(tiny_llama):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    prompt = random_prompts(1, 320, seed=5, lengths=[40])[0]
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    llm = LLM(tiny_llama, num_kv_blocks=64, max_model_len=512, max_num_batched_tokens=16)  # 3 chunks
    out = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2))[0]
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    for pos in range(1, len(prompt)):
        row = out.prompt_logprobs[pos]
        assert abs(row[prompt[pos]] - float(want[pos - 1, prompt[pos]])) < 1e-4
        top2 = want[pos - 1].topk(2).indices.tolist()
        assert set(top2) <= set(row)
