"""Tensor parallelism: the process group and its collectives (state), how a model splits across
ranks and which checkpoint slice each rank reads (sharding), and the worker ranks that run the
same forward as rank 0 (workers). docs/parallelism.md tells the whole story."""
