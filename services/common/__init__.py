"""Pieces every tier shares: the wire contract (proto.py, convert.py, types.py), the error mapping
(errors.py), configuration (config.py), gRPC server set-up (server.py), Redis streams (streams.py),
the tracing/metrics hook points (hooks.py), and the observability libraries they will call
(telemetry.py, metrics.py, healthprobe.py)."""
