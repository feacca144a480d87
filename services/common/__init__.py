"""Pieces every tier shares: the wire contract (proto.py, convert.py), the error mapping
(errors.py), configuration (config.py), gRPC server set-up (server.py), Redis streams (streams.py)."""
