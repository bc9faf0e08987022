"""Ulysses: an all-to-all turns sequence-sharded q/k/v into head-sharded ones over the whole
(ring-local) sequence, and a second all-to-all turns the output back.

With U ranks each holding T_u tokens of all H heads, rank u ends up with the H/U heads
[u·H/U, (u+1)·H/U) of all ΣT tokens, in rank order. K/V heads are split the same way when
U divides them; when they are fewer than U, each is repeated only as often as needed (U/Hkv),
and autograd sums the repeated heads' gradients back. Uneven T_u are allowed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor


def check_heads(n_heads: int, n_kv_heads: int, degree: int) -> None:
    if n_heads % degree:
        raise ValueError(f"n_heads={n_heads} is not divisible by the Ulysses degree {degree}")
    if n_kv_heads % degree and degree % n_kv_heads:
        raise ValueError(f"n_kv_heads={n_kv_heads} and the Ulysses degree {degree}: one must divide the other")


def _spread_kv(x: torch.Tensor, degree: int) -> torch.Tensor:
    heads = x.shape[1]
    return x if heads % degree == 0 else x.repeat_interleave(degree // heads, dim=1)


def seq_to_heads(x: torch.Tensor, split: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """[T_u, H, D] (this rank's tokens) → [ΣT, H/U, D] (all tokens, this rank's heads)."""
    degree = len(split)
    t, h, d = x.shape
    send = x.reshape(t, degree, h // degree, d).transpose(0, 1).reshape(degree * t, h // degree, d)
    return wait_tensor(all_to_all_single_autograd(send, split, [t] * degree, group))


def heads_to_seq(x: torch.Tensor, split: list[int], rank: int, group: dist.ProcessGroup) -> torch.Tensor:
    """The inverse: [ΣT, H/U, D] → [T_u, H, D]."""
    degree = len(split)
    t = split[rank]
    _, hl, d = x.shape
    out = wait_tensor(all_to_all_single_autograd(x.contiguous(), [t] * degree, split, group))
    return out.reshape(degree, t, hl, d).transpose(0, 1).reshape(t, degree * hl, d)


def ulysses_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, split: list[int], group: dist.ProcessGroup):
    degree = len(split)
    check_heads(q.shape[1], k.shape[1], degree)
    return (seq_to_heads(q, split, group), seq_to_heads(_spread_kv(k, degree), split, group),
            seq_to_heads(_spread_kv(v, degree), split, group))
