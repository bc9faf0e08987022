"""Attention on one device over packed documents, through the block interface of `backends`.

`LocalAttention` is what a model calls when the sequence is not split (sp = 1); the sequence-
parallel variants offer the same call, `attend(q, k, v) -> out`, so the model never knows which
one it holds.
"""

from __future__ import annotations

import torch

from parallel.attention.backends import AttentionBackend
from parallel.attention.dispatch import select_backend
from parallel.attention.mask import BlockMask

__all__ = ["AttentionBackend", "BlockMask", "LocalAttention", "block_attention", "select_backend"]


class _BlockAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, backend: AttentionBackend, mask: BlockMask, scale: float):
        out, lse = backend.forward(q, k, v, mask, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.backend, ctx.mask, ctx.scale = backend, mask, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.backend.backward(dout.contiguous(), q, k, v, out, lse, ctx.mask, ctx.scale)
        return dq, dk, dv, None, None, None


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: AttentionBackend,
                    mask: BlockMask, scale: float | None = None) -> torch.Tensor:
    """Differentiable attention of one q block over one k/v block."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _BlockAttention.apply(q, k, v, backend, mask, scale)


class LocalAttention:
    """Causal attention within each packed document of a micro-batch held whole on this rank."""

    def __init__(self, backend: AttentionBackend, cu_seqlens: torch.Tensor, max_seqlen: int,
                 window: int = 0, causal: bool = True, lengths: list[int] | None = None):
        """`lengths`: the documents' lengths on the host, when known (they let cuDNN take the long ones)."""
        self.backend = backend
        self.mask = BlockMask.packed(cu_seqlens, max_seqlen, causal=causal, window=window,
                                     lengths=tuple(lengths) if lengths is not None else None)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return block_attention(q, k, v, self.backend, self.mask)
