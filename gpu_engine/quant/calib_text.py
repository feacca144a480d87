"""Fixed offline text for calibration and for quality checks: CPython's own documentation.

`pydoc_data.topics` ships with every CPython (the Python Language Reference, about 465k characters
of English prose and code in 79 topics); nothing is downloaded. Topics are taken in sorted order:
the even-numbered ones calibrate, the odd-numbered ones are held out for perplexity, so a
quantizer never sees the text its quality is measured on.
"""

from __future__ import annotations

import torch


def _topics(parity: int) -> str:
    from pydoc_data.topics import topics

    names = sorted(topics)
    return "\n\n".join(topics[name].strip() for i, name in enumerate(names) if i % 2 == parity)


def calibration_text() -> str:
    """The even-numbered topics of the Python Language Reference."""
    return _topics(0)


def evaluation_text() -> str:
    """The odd-numbered topics (held out from calibration)."""
    return _topics(1)


def token_windows(ids: list[int], num_samples: int, seq_len: int) -> torch.Tensor:
    """[num_samples, seq_len] int64: consecutive windows of the token stream `ids`."""
    if num_samples < 1 or seq_len < 1:
        raise ValueError(f"num_samples and seq_len must be positive, got {num_samples}, {seq_len}")
    need = num_samples * seq_len
    if len(ids) < need:
        raise ValueError(
            f"the text has {len(ids)} tokens, fewer than num_samples * seq_len = {need}; "
            "ask for fewer or shorter samples"
        )
    return torch.tensor(ids[:need], dtype=torch.int64).view(num_samples, seq_len)
