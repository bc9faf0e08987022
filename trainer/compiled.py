"""The parts of the model that run through `torch.compile`: the memory-bound element-wise work.

Attention goes to its own kernels (cuDNN, flash) and the matmuls to cuBLAS either way; what eager
mode leaves slow is the chain of small element-wise kernels around them — RMSNorm, RoPE in fp32,
SwiGLU's silu · gate, the fp32 log-softmax of the loss. Each block's norms, its q/k/v
projection with RoPE and its feed-forward network, and the loss's softmax over a chunk of logits are
compiled as separate regions, so Inductor fuses those chains into a few kernels while
the attention call, its autograd function and any sequence-parallel communication stay eager
(no graph breaks to manage). Weights may be FSDP shards or checkpoint-wrapped blocks: compiling
happens inside those wrappers and leaves parameter names unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.model import Attention


def unwrapped(block: nn.Module) -> nn.Module:
    """A transformer block without its activation-checkpoint wrapper."""
    return getattr(block, "_checkpoint_wrapped_module", block)


def compile_elementwise(model: nn.Module) -> None:
    """Compiles, in place, the element-wise regions of every block this model part holds."""
    for wrapped in model.layers.values():
        block = unwrapped(wrapped)
        for region in (block.attention_norm, block.ffn_norm, block.feed_forward):
            region.compile(dynamic=None)
        if isinstance(block.attention, Attention):
            block.attention.project = torch.compile(block.attention.project, dynamic=None)
    if getattr(model, "output", None) is not None:  # the last stage: final norm and the loss
        model.norm.compile(dynamic=None)
        model.logit_grads = torch.compile(model.logit_grads, dynamic=None)
