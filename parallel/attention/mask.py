"""Which keys a query may see: document membership, causality and a sliding window.

A block of tokens is described by a `Span`: the document each token belongs to and its global
position in the (packed) sequence. A `BlockMask` pairs a query span with a key span; kernels
that take varlen boundaries read `cu_seqlens`, dense kernels read `dense()`. The same object
serves a whole sequence (sp = 1) and the q/k blocks of a ring step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Span:
    doc: torch.Tensor  # [T] int32: document index of each token
    pos: torch.Tensor  # [T] int64: global position of each token in the packed sequence
    cu_seqlens: torch.Tensor | None = None  # [docs + 1] int32 when each document's tokens are contiguous
    max_seqlen: int = 0

    @staticmethod
    def from_cu_seqlens(cu_seqlens: torch.Tensor, max_seqlen: int) -> "Span":
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        doc = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device, dtype=torch.int32),
                                      lengths.to(torch.int64))
        pos = torch.arange(doc.numel(), device=cu_seqlens.device)
        return Span(doc, pos, cu_seqlens, max_seqlen)

    def __len__(self) -> int:
        return int(self.doc.numel())


@dataclass
class BlockMask:
    q: Span
    k: Span
    causal: bool = True
    window: int = 0  # 0: unlimited
    _dense: torch.Tensor | None = field(default=None, repr=False)
    _additive: dict = field(default_factory=dict, repr=False)

    @property
    def same_span(self) -> bool:
        return self.q is self.k

    def dense(self) -> torch.Tensor:
        """[Tq, Tk] bool, True where the query may attend to the key."""
        if self._dense is None:
            qd, kd = self.q.doc[:, None], self.k.doc[None, :]
            qp, kp = self.q.pos[:, None], self.k.pos[None, :]
            visible = qd == kd
            if self.causal:
                visible &= qp >= kp
            if self.window:
                visible &= (qp - kp).abs() < self.window
            self._dense = visible
        return self._dense

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        """[Tq, Tk] float: 0 where visible, -inf where masked (for kernels that add a bias)."""
        if dtype not in self._additive:
            bias = torch.zeros(self.dense().shape, dtype=dtype, device=self.q.doc.device)
            self._additive[dtype] = bias.masked_fill_(~self.dense(), float("-inf"))
        return self._additive[dtype]
