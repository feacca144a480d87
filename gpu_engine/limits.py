"""Every limit on one request, in one place: SamplingParams checks the parameter limits, the
engine checks token ids against its vocabulary and lengths against its context, and the gateway
adds the size of the request message (GatewayConfig.max_request_bytes). docs/services.md lists
them ("Limits")."""

from __future__ import annotations

MAX_N = 128
"""Samples per prompt (SamplingParams.n)."""
MAX_STOP_STRINGS = 16
"""Stop strings per request."""
MAX_STOP_STRING_CHARS = 256
"""Characters per stop string."""
MAX_STOP_TOKEN_IDS = 256
"""Stop token ids per request (each also below the vocabulary size)."""
MAX_LOGPROBS = 20
"""Top-N alternatives per position (logprobs, prompt_logprobs)."""
MAX_REQUEST_ID_CHARS = 256
"""Characters of a caller's request_id (the gateway's public API)."""
