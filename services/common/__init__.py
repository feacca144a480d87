"""Pieces every service tier shares: health probe, tracing and metrics setup."""
