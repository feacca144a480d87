"""Helpers for comparing with Hugging Face transformers."""

from __future__ import annotations

import torch


def random_prompts(n: int, vocab: int, seed: int, lengths=None) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = lengths or [int(x) for x in torch.randint(1, 80, (n,), generator=gen)]
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for length in lengths]


def hf_greedy(model, prompt: list[int], max_new: int) -> tuple[list[int], list[float]]:
    """HF greedy continuation (EOS ignored) and the log-probability of each chosen token."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt):].tolist()
    lps = [float(torch.log_softmax(l[0].float(), -1)[t]) for l, t in zip(out.logits, tokens)]
    return tokens, lps
