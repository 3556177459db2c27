"""Tensor parallelism: one engine over ``tensor_parallel_size`` ranks.

Rank 0 runs in the engine's own process and owns everything but its shard of the
model: the scheduler, the radix prefix cache, the tiers and the sampler. Ranks 1 ..
N-1 are spawned worker processes (``worker.py``) that hold their shards of the model
and of the KV pools and do what rank 0 tells them, one message per step:

- ``StepPlan``: forward these chunks (token ids, positions, block tables, flags) with
  the same block ids in their own pools; only rank 0 keeps the logits;
- ``ReadBlocks`` / ``WriteBlocks``: join rank 0 in a gather (offload to a tier) or a
  scatter (load from a tier) of the blocks' shards;
- ``Stop``: leave the loop.

``WorkerGroup`` (``group.py``) starts the workers and the ``torch.distributed`` group,
watches them, and stops them; ``TensorParallelRunner`` (``runner.py``) is the
``ModelRunner`` the core sees; ``ShardedKVTransfer`` (``transfer.py``) moves every
rank's shard of a block between the device pools and the tiers.
"""

from prefixcache.engine.tensor_parallel.group import WorkerGroup
from prefixcache.engine.tensor_parallel.runner import TensorParallelRunner
from prefixcache.engine.tensor_parallel.transfer import ShardedKVTransfer

__all__ = ["ShardedKVTransfer", "TensorParallelRunner", "WorkerGroup"]
