"""How the model becomes parallel: pipeline stages, then per part in torchtitan's order — tensor
parallelism, activation checkpointing, compilation, FSDP.

Pipeline stages are pruned copies of the whole model (the layers a stage runs, plus the embedding
on the first and the norm and output on the last), so parameter names stay those of the whole
model and checkpoints reshard across layouts; rank r runs stages r, r + pp, … (interleaved 1F1B).

Tensor parallelism is Megatron's layout through DTensor's `parallelize_module`: column-parallel
q/k/v and w1/w3, row-parallel wo and w2, a vocab-parallel embedding and output layer whose logits
stay sharded over the vocabulary for a loss-parallel cross-entropy, and sequence-parallel
activations between the TP regions (norms and residuals hold T/tp tokens; an all-gather enters
attention and the MLP, a reduce-scatter leaves them). Attention sees the local heads only, so
ring / Ulysses / LASP compose with it unchanged; linear layers keep the decay of their local K/V
heads. DTensor rather than megatron-core's layers: its parameters compose with FSDP2 (2-D dp × tp
meshes) and with DCP resharding, and run on gloo for the CPU tests.

Activation checkpointing wraps whole blocks; a block may keep its attention kernels' outputs
(selective checkpointing by op) and run its SwiGLU in tiles (`trainer.model.tiled`), as the job's
memory saving says.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from parallel.data_parallel import apply_fsdp
from parallel.mesh import ParallelDims
from trainer.activation_offload import InputOffload
from trainer.compiled import compile_elementwise
from trainer.model import LinearAttention, Transformer


def stage_ids(pp_rank: int, pp: int, virtual: int) -> list[int]:
    """The pipeline stages a pp rank runs."""
    return [pp_rank + pp * v for v in range(virtual)]


def split_model(model: Transformer, stage: int, stages: int) -> Transformer:
    """A copy of the model holding only what stage `stage` of `stages` runs."""
    per = len(model.layers) // stages
    keep = {str(i) for i in range(stage * per, (stage + 1) * per)}
    part = copy.deepcopy(model)
    for name in list(part.layers.keys()):
        if name not in keep:
            del part.layers[name]
    if stage > 0:
        part.tok_embeddings = None
    if stage < stages - 1:
        part.norm = None
        part.output = None
    return part


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
        # heads are sharded over tp: a per-head norm's weight is shared by them, its gradient summed over tp
        if isinstance(block.attention, LinearAttention):
            plan["attention.head_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
        elif block.attention.q_norm is not None:
            plan["attention.q_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
            plan["attention.k_norm"] = SequenceParallel(sequence_dim=1, use_local_output=True)
        parallelize_module(block, mesh, plan)
        if isinstance(block.attention, LinearAttention):  # this rank's K/V heads keep their own decay
            heads = block.attention.log_decay.numel() // tp
            block.attention.log_decay = block.attention.log_decay[rank * heads:(rank + 1) * heads].clone()


# the attention kernels' forward ops: a block that keeps its attention output saves what these return
ATTENTION_KERNELS = {op for op in (
    getattr(torch.ops.aten, name).default for name in (
        "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention"))}


def _keep_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_KERNELS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, blocks: set[int], keep_attention: bool = False,
                                   offload: InputOffload | None = None) -> None:
    """Wraps the named transformer blocks (global layer indices; a pipeline stage holds some) so that
    their activations are recomputed in backward (non-reentrant: collectives inside, such as the
    ring's, simply run again in the same order on every rank). With `keep_attention` the attention
    kernels' outputs are saved instead (selective checkpointing by op): backward then runs only the
    block's matmuls and element-wise work again. With `offload` the input each keeps goes to host
    memory (trainer.activation_offload)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    kwargs = {"context_fn": partial(create_selective_checkpoint_contexts, _keep_attention)} if keep_attention else {}
    previous = None
    for name, block in list(model.layers.items()):
        if int(name) in blocks:
            model.layers[name] = checkpoint_wrapper(block, preserve_rng_state=False, **kwargs)
            if offload is not None:
                offload.attach(model.layers[name], previous)
                previous = model.layers[name]


def parallelize(part: Transformer, dims: ParallelDims, recomputed: set[int], compiled: bool,
                fsdp: bool, param_dtype: torch.dtype, keep_attention: bool = False, mlp_tile: int = 0,
                offload: InputOffload | None = None) -> None:
    """Makes one model part parallel in place: tp → activation checkpointing (and SwiGLU tiles) →
    compile → FSDP. Adaptive SP runs different numbers of micro-batches per rank: FSDP then gathers
    once per step."""
    if dims.layout.tp > 1:
        apply_tp(part, dims.mesh["tp"])
    for block in part.layers.values():
        block.mlp_tile = mlp_tile
    apply_activation_checkpointing(part, recomputed, keep_attention, offload)
    if compiled:
        compile_elementwise(part)
    if fsdp:
        apply_fsdp(part, dims.fsdp_mesh, param_dtype=param_dtype, reshard_after_forward=not dims.layout.adaptive)
