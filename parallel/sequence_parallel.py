"""Sequence parallelism for one micro-batch: which tokens this rank keeps, and its attention.

`sp.method`: `ring` (zigzag ring), `ring_bidir` (the ring in both directions at once, TokenRing),
`ulysses` (all-to-all head/sequence swap) and `hybrid` (Ulysses inside groups of U ranks × a
ring across them). All are one composition — all-to-all in, ring attention over R ring ranks,
all-to-all out — with U = 1 or R = 1 where a method has no such part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.attention.backends import AttentionBackend
from parallel.ring import RingContext, ring_attention
from parallel.sp_layout import SequenceLayout
from parallel.ulysses import heads_to_seq, ulysses_qkv



@dataclass
class SPGroups:
    """This rank's place in its SP group: ring × Ulysses coordinates and their process groups."""

    ring_size: int
    ulysses_size: int
    ring_rank: int
    ulysses_rank: int
    ring_group: dist.ProcessGroup | None
    ring_reverse_group: dist.ProcessGroup | None
    ulysses_group: dist.ProcessGroup | None
    bidirectional: bool = False

    @property
    def size(self) -> int:
        return self.ring_size * self.ulysses_size

    @property
    def rank(self) -> int:
        return self.ring_rank * self.ulysses_size + self.ulysses_rank


class SequenceParallelAttention:
    """`attend(q, k, v)` for this rank's share of a micro-batch (the model's attention callable)."""

    def __init__(self, layout: SequenceLayout, groups: SPGroups, backend: AttentionBackend):
        self.layout, self.groups = layout, groups
        self.ring = RingContext(layout, groups.ring_rank, groups.ring_group, groups.ring_reverse_group,
                                backend, groups.bidirectional)
        self.split = layout.ulysses_split(groups.ring_rank)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        g = self.groups
        if g.ulysses_size > 1:
            q, k, v = ulysses_qkv(q, k, v, self.split, g.ulysses_group)
        out = ring_attention(q, k, v, self.ring)
        if g.ulysses_size > 1:
            out = heads_to_seq(out, self.split, g.ulysses_rank, g.ulysses_group)
        return out


def make_layout(doc_lengths: list[int], groups: SPGroups, causal: bool = True, window: int = 0,
                device: torch.device | str = "cpu", zigzag: bool = True) -> SequenceLayout:
    """zigzag=False: contiguous slices (models with linear attention: one state per rank)."""
    return SequenceLayout(doc_lengths, groups.ring_size, groups.ulysses_size, zigzag=zigzag, causal=causal,
                          window=window, device=device)
