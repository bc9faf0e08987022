"""Tensor parallelism (Megatron layout) with DTensor's `parallelize_module`.

Column-parallel q/k/v and w1/w3, row-parallel wo and w2, a vocab-parallel embedding and output
layer whose logits stay sharded over the vocabulary for a loss-parallel cross-entropy, and
sequence-parallel activations between the TP regions: norms and residuals hold T/tp tokens each,
an all-gather enters attention and the MLP, a reduce-scatter leaves them. Token streams are padded
to a multiple of tp by the trainer. Attention sees the local heads only, so ring / Ulysses / LASP
compose with it unchanged; linear layers keep the decay of their local K/V heads.

Chosen over megatron-core's `tensor_parallel` layers because DTensor parameters compose with FSDP2
(2-D dp × tp meshes) and with `torch.distributed.checkpoint` resharding to other layouts, and run
on gloo for the CPU tests; megatron-core's layers need CUDA for their RNG tracker, sequence
parallelism and recompute.
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from trainer.model import LinearAttention, Transformer


def apply_tp(model: Transformer, mesh: DeviceMesh) -> None:
    tp = mesh.size()
    rank = mesh.get_local_rank()
    top = {}
    if model.tok_embeddings is not None:  # (a pipeline stage holds only some of these)
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0))
    if model.output is not None:
        top["norm"] = SequenceParallel(sequence_dim=0)
        top["output"] = ColwiseParallel(input_layouts=Shard(0), output_layouts=Shard(-1), use_local_output=False)
    if top:
        parallelize_module(model, mesh, top)
    for block in model.layers.values():
        plan = {
            "attention_norm": SequenceParallel(sequence_dim=0),
            "attention": PrepareModuleInput(input_layouts=(Shard(0), None, None, None),
                                            desired_input_layouts=(Replicate(), None, None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(0)),
            "ffn_norm": SequenceParallel(sequence_dim=0),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(0),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(0)),
        }
        if isinstance(block.attention, LinearAttention):
            # heads are sharded over tp: the per-head norm's weight is shared, its gradient summed over tp
            plan["attention.head_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
        parallelize_module(block, mesh, plan)
        if isinstance(block.attention, LinearAttention):  # this rank's K/V heads keep their own decay
            heads = block.attention.log_decay.numel() // tp
            block.attention.log_decay = block.attention.log_decay[rank * heads:(rank + 1) * heads].clone()


def check_tp(n_heads: int, n_kv_heads: int, tp: int) -> str:
    """'' if the heads split over tp ranks, else why not."""
    if n_heads % tp:
        return f"model.n_heads={n_heads} is not divisible by tp={tp}"
    if n_kv_heads % tp:
        return f"model.n_kv_heads={n_kv_heads} is not divisible by tp={tp}"
    return ""

