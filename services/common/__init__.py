"""Pieces every tier shares: the wire contract (proto.py, convert.py, types.py), the error mapping
(errors.py), configuration (config.py), gRPC server set-up (server.py), Redis streams (streams.py),
start-up and drain admission (drain.py), and observability: tracing (telemetry.py), metrics
(metrics.py), both per tier instance (observe.py), and the health probe (healthprobe.py)."""
