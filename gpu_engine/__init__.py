"""The engine library: models, weights, paged KV cache, step loop, sampler. No gRPC, no Redis."""
