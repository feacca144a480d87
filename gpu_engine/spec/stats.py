"""Per-engine speculative-decoding counters (vLLM's spec-decode metrics). No torch."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodeStats:
    """What the verify steps drafted and accepted, summed since the engine started."""

    num_drafts: int = 0
    """Verify entries run (one per speculating sequence and step)."""
    num_draft_tokens: int = 0
    """Drafted tokens verified."""
    num_accepted_tokens: int = 0
    """Drafted tokens accepted."""
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)
    """Index j: how often draft j of a verify entry (0-based) was accepted."""

    def record(self, num_drafted: int, num_accepted: int) -> None:
        if not 0 <= num_accepted <= num_drafted:
            raise ValueError(f"accepted {num_accepted} of {num_drafted} drafted tokens")
        self.num_drafts += 1
        self.num_draft_tokens += num_drafted
        self.num_accepted_tokens += num_accepted
        per_pos = self.num_accepted_tokens_per_pos
        if len(per_pos) < num_drafted:
            per_pos.extend([0] * (num_drafted - len(per_pos)))
        for j in range(num_accepted):
            per_pos[j] += 1

    def snapshot(self) -> "SpecDecodeStats":
        return SpecDecodeStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                               list(self.num_accepted_tokens_per_pos))

    def since(self, earlier: "SpecDecodeStats") -> "SpecDecodeStats":
        """What was counted after the `earlier` snapshot."""
        old = earlier.num_accepted_tokens_per_pos
        return SpecDecodeStats(
            self.num_drafts - earlier.num_drafts, self.num_draft_tokens - earlier.num_draft_tokens,
            self.num_accepted_tokens - earlier.num_accepted_tokens,
            [n - (old[j] if j < len(old) else 0) for j, n in enumerate(self.num_accepted_tokens_per_pos)])

    def summary(self) -> dict:
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens,
                "num_accepted_tokens_per_pos": list(self.num_accepted_tokens_per_pos),
                "acceptance_rate": round(self.num_accepted_tokens / self.num_draft_tokens, 4)
                if self.num_draft_tokens else 0.0,
                "mean_acceptance_length": round(self.mean_acceptance_length, 3)}

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verify entry (accepted drafts + the corrected or bonus token)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0
