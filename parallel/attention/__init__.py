"""Attention on one device over packed documents, through the block interface of `backends`.

`LocalAttention` is what a model calls when the sequence is not split (sp = 1); the sequence-
parallel variants offer the same call, `attend(q, k, v) -> out`, so the model never knows which
one it holds. `warm_up` builds a backend's kernel plans before the first step.
"""

from __future__ import annotations

import torch

from parallel.attention.backends import AttentionBackend
from parallel.attention.dispatch import select_backend
from parallel.attention.mask import BlockMask

__all__ = ["AttentionBackend", "BlockMask", "LocalAttention", "block_attention", "select_backend", "warm_up"]


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


def warm_up(backend: AttentionBackend, longest: int, q_heads: int, kv_heads: int, head_dim: int,
            dtype: torch.dtype, device: torch.device) -> int:
    """Runs one causal document forward and backward per plan the backend keeps for documents of up
    to `longest` tokens, through autograd as training does (cuDNN keeps plans per thread, and
    backward runs on autograd's), so that no step pays for building them. Returns how many ran."""
    lengths = backend.plan_lengths(1, longest) if device.type == "cuda" else []
    for n in lengths:
        q, k, v = (torch.randn(n, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for heads in (q_heads, kv_heads, kv_heads))
        cu = torch.tensor([0, n], dtype=torch.int32, device=device)
        LocalAttention(backend, cu, n, lengths=[n])(q, k, v).sum().backward()
    return len(lengths)
