"""TrainDraftConfig: the settings of `taxiway train-draft` (no torch: the CLI builds its flags from
these fields)."""

from __future__ import annotations

from dataclasses import dataclass

from gpu_engine.config import setting


@dataclass(frozen=True)
class TrainDraftConfig:
    """Everything `taxiway train-draft` takes (its flags are these fields)."""

    target: str | None = setting(None, "the target model's folder (default: SmolLM2-135M-Instruct)")
    out: str = setting("eagle3-head", "folder to write the head to (config.json, model.safetensors)")
    prompts: str | None = setting(
        None, "JSON-lines prompt file, one {\"prompt\": ..., \"kind\": ...} a line (default: the shipped "
              "chat, summarisation and code prompts)")
    num_prompts: int | None = setting(None, "use the first N prompts only (default: all)")
    holdout_prompts: int = setting(24, "prompts held out to measure the acceptance length")
    samples_per_prompt: int = setting(4, "answers per prompt: one greedy, the rest sampled")
    sample_temperature: float = setting(0.8, "temperature of the sampled answers")
    max_new_tokens: int = setting(256, "longest answer generated per prompt")
    draft_vocab_size: int = setting(16384, "the head's vocabulary: the answers' most used tokens")
    ttt_steps: int = setting(5, "draft steps unrolled by the training-time test")
    steps: int = setting(4000, "most optimizer steps")
    time_budget_s: float = setting(240.0, "stop training after this many seconds even if steps remain")
    batch_size: int = setting(16, "sequences per optimizer step")
    max_seq_len: int = setting(1024, "training sequences are cut to this many tokens")
    lr: float = setting(5e-4, "peak learning rate (AdamW, linear warmup, cosine decay to 10%)")
    warmup_steps: int = setting(100, "learning-rate warmup steps")
    eval_k: int = setting(4, "drafted tokens per step when measuring the held-out acceptance length")
    device: str = setting("auto", "torch device: auto, cpu, cuda, cuda:N")
    dtype: str = setting("auto", "the target's dtype: auto, float32, bfloat16, float16")
    seed: int = setting(0, "seeds the sampled answers, the split, the head's initialization and batches")
    progress: bool = setting(True, "show progress bars")

    def __post_init__(self) -> None:
        for name in ("holdout_prompts", "samples_per_prompt", "max_new_tokens", "draft_vocab_size", "ttt_steps",
                     "steps", "batch_size", "max_seq_len", "eval_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "holdout_prompts" else 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_prompts is not None and self.num_prompts <= self.holdout_prompts:
            raise ValueError(f"num_prompts ({self.num_prompts}) must exceed holdout_prompts "
                             f"({self.holdout_prompts}): some prompts must be left to train on")
        if not self.lr > 0 or not self.time_budget_s > 0:
            raise ValueError(f"lr and time_budget_s must be positive, got {self.lr} and {self.time_budget_s}")
