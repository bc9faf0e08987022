"""Data parallelism with FSDP2 (`fully_shard`) over dp × sp, with bf16 compute and fp32 reductions.

FSDP averages gradients over its dp × sp ranks. The trainer therefore scales each rank's summed
token loss by dp × sp / (global label tokens of the step): the average is then the gradient of
the global mean loss, and one worker and many make the same update on the same global batch.
(Summing instead, with a divide factor of 1, needs PREMUL_SUM, which gloo lacks.)
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype = torch.float32,
               reshard_after_forward: bool = True) -> FSDPModule:
    """Shards each transformer block (`model.layers`), then the rest of the model (a pipeline
    stage: what it holds), over `mesh`."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model
