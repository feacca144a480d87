"""Speculative decoding: proposers (n-gram, draft model, EAGLE-3), the rejection sampler that keeps
the target's distribution, and training an EAGLE-3 head (`taxiway train-draft`).

Kept free of torch imports at package level: gpu_engine.config reads SpeculativeConfig from here."""

from gpu_engine.spec.config import METHODS, SpeculativeConfig, parse_speculative_config

__all__ = ["METHODS", "SpeculativeConfig", "parse_speculative_config"]
