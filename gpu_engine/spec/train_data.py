"""Self-distillation data for an EAGLE-3 head: the target answers prompts (through our own engine,
batched), then one forward over each prompt + answer keeps its hidden states."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from gpu_engine.sampling_params import SamplingParams

SHIPPED_PROMPTS = "prompts.jsonl"


@dataclass
class Example:
    prompt_ids: list[int]
    response_ids: list[int]
    greedy: bool
    """The response is the target's greedy continuation (what held-out acceptance is measured on)."""
    prompt_index: int = 0
    kind: str = ""

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def load_prompts(path: str | Path | None = None) -> list[dict]:
    """Prompts as {"kind": ..., "prompt": text} from a JSON-lines file (default: the shipped set of
    chat questions, summarisation-style prompts that repeat their input, and code)."""
    if path is None:
        text = resources.files("gpu_engine.spec").joinpath("data", SHIPPED_PROMPTS).read_text()
        where = f"gpu_engine/spec/data/{SHIPPED_PROMPTS}"
    else:
        text, where = Path(path).read_text(), str(path)
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}:{i}: not JSON: {exc}") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"]:
            raise ValueError(f'{where}:{i}: expected {{"prompt": "text", "kind": "..."}}, got {line[:80]!r}')
        rows.append({"kind": str(row.get("kind", "")), "prompt": row["prompt"]})
    if not rows:
        raise ValueError(f"{where} holds no prompts")
    return rows


def encode_prompts(tokenizer, prompts: list[dict]) -> list[list[int]]:
    """Each prompt as a user message through the chat template (plain text without one)."""
    if tokenizer is None:
        raise ValueError("the target has no tokenizer.json: pass prompts as token ids")
    if tokenizer.chat_template is None:
        return [tokenizer.encode(p["prompt"]) for p in prompts]
    return [tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}],
                                          add_generation_prompt=True, tokenize=True) for p in prompts]


def generate(llm, prompt_ids: list[list[int]], kinds: list[str], max_new_tokens: int, samples: int,
             temperature: float, seed: int) -> list[Example]:
    """The target's answers: one greedy per prompt, then samples - 1 drawn at `temperature`."""
    greedy = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
    outs = llm.generate(prompt_ids, greedy)
    examples = [Example(p, list(o.outputs[0].token_ids), True, i, k)
                for i, (p, o, k) in enumerate(zip(prompt_ids, outs, kinds))]
    for s in range(1, samples):
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed * 7919 + s * 104729 + i)
                  for i in range(len(prompt_ids))]
        outs = llm.generate(prompt_ids, params)
        examples += [Example(p, list(o.outputs[0].token_ids), False, i, k)
                     for i, (p, o, k) in enumerate(zip(prompt_ids, outs, kinds))]
    return [e for e in examples if len(e.response_ids) >= 2]


def draft_vocabulary(examples: list[Example], vocab_size: int, size: int) -> torch.Tensor:
    """The `size` target ids the responses use most (ties: lower id), ascending [size] int64."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for e in examples:
        counts.index_add_(0, torch.tensor(e.response_ids, dtype=torch.int64),
                          torch.ones(len(e.response_ids), dtype=torch.float64))
    counts -= torch.arange(vocab_size, dtype=torch.float64) * 1e-9  # deterministic ties
    return counts.topk(size).indices.sort().values


def split_holdout(examples: list[Example], num_prompts: int, holdout: int, seed: int):
    """(train, held-out) split by prompt, so no held-out prompt is trained on; the held-out set
    keeps the greedy answers only."""
    order = list(range(num_prompts))
    random.Random(seed).shuffle(order)
    held = set(order[:holdout])
    train = [e for e in examples if e.prompt_index not in held]
    test = [e for e in examples if e.prompt_index in held and e.greedy]
    return train, test
