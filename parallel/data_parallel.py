"""Data parallelism with FSDP2 (`fully_shard`) over dp × sp, and (selective) activation checkpointing of blocks.

FSDP averages gradients over dp ranks. The trainer therefore scales each rank's summed token
loss by dp / (global label tokens of the step): the average is then the gradient of the global
mean loss, and one worker and many make the same update on the same global batch. (Summing
instead, with a divide factor of 1, needs PREMUL_SUM, which gloo lacks.)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def checkpointed_blocks(count: int, n_layers: int) -> set[int]:
    """Indices of `count` of the model's `n_layers` blocks, spread evenly (selective checkpointing)."""
    return {j * n_layers // count for j in range(count)} if count > 0 else set()


def apply_activation_checkpointing(model: nn.Module, blocks: set[int]) -> None:
    """Wraps the named transformer blocks (global layer indices; a pipeline stage holds some) so that
    their activations are recomputed in backward (non-reentrant: collectives inside, such as the
    ring's, simply run again in the same order on every rank)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for name, block in list(model.layers.items()):
        if int(name) in blocks:
            model.layers[name] = checkpoint_wrapper(block)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype = torch.float32,
               reshard_after_forward: bool = True) -> FSDPModule:
    """Shards each transformer block, then the rest of the model (a pipeline stage: what it holds), over `mesh`."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model
