"""Which keys a query may see, described the way varlen attention kernels take it.

A `BlockMask` pairs the rows of a query block with the rows of a key block as a batch of
independent sequences: sequence b has queries q[cu_q[b]:cu_q[b+1]] and keys k[cu_k[b]:cu_k[b+1]],
and no query sees a key of another sequence. Inside a sequence the flash-attention convention
holds: query i is aligned with key i + (n_k − n_q) (bottom-right); `causal` hides keys after
that diagonal; a window keeps keys within [diag − window_left, diag + window_right] (−1 = no
limit). Optional row selections (`q_rows`, `k_rows`) say which rows of the full q / k blocks take
part; rows outside them get nothing from this block.

CUDA kernels read this description directly; CPU kernels read `dense()`, built from it, so the
CPU tests check exactly the metadata the GPU kernels receive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Rows = slice | torch.Tensor | None  # None: every row


def select_rows(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    if rows is None:
        return x
    if isinstance(rows, slice):
        return x[rows]
    return x.index_select(0, rows)


@dataclass
class BlockMask:
    cu_q: torch.Tensor  # [n + 1] int32
    cu_k: torch.Tensor  # [n + 1] int32
    max_q: int
    max_k: int
    causal: bool = True
    window_left: int = -1
    window_right: int = -1
    q_rows: Rows = None
    k_rows: Rows = None
    q_lengths: tuple[int, ...] | None = None  # rows of each sequence, on the host, when the caller knows them
    k_lengths: tuple[int, ...] | None = None
    cache: dict = field(default_factory=dict, repr=False)  # what kernels work out from it once (dense mask, routes)

    @staticmethod
    def packed(cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool = True, window: int = 0,
               lengths: tuple[int, ...] | None = None) -> "BlockMask":
        """Attention inside each document of a packed stream (query and key rows are the same)."""
        left = window - 1 if window else -1
        return BlockMask(cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal, left, 0 if causal else left,
                         q_lengths=lengths, k_lengths=lengths)

    @property
    def num_sequences(self) -> int:
        return int(self.cu_q.numel()) - 1

    def dense(self) -> torch.Tensor:
        """[Tq, Tk] bool over the selected rows, True where the query sees the key."""
        if "dense" not in self.cache:
            self.cache["dense"] = _dense_from_varlen(self)
        return self.cache["dense"]

    def additive(self, dtype: torch.dtype) -> torch.Tensor:
        """[Tq, Tk]: 0 where visible, −inf where hidden (for kernels that add a bias)."""
        if ("additive", dtype) not in self.cache:
            bias = torch.zeros(self.dense().shape, dtype=dtype, device=self.cu_q.device)
            self.cache["additive", dtype] = bias.masked_fill_(~self.dense(), float("-inf"))
        return self.cache["additive", dtype]


def _segment_ids(cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence id, index within its sequence) of every row described by cu_seqlens."""
    lengths = (cu[1:] - cu[:-1]).to(torch.int64)
    seq = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    index = torch.arange(seq.numel(), device=cu.device) - cu[:-1].to(torch.int64)[seq]
    return seq, index


def _dense_from_varlen(m: BlockMask) -> torch.Tensor:
    q_seq, qi = _segment_ids(m.cu_q)
    k_seq, kj = _segment_ids(m.cu_k)
    nq = (m.cu_q[1:] - m.cu_q[:-1]).to(torch.int64)[q_seq]
    nk = (m.cu_k[1:] - m.cu_k[:-1]).to(torch.int64)[q_seq]
    diag = (qi + nk - nq)[:, None]  # key index aligned with each query
    kj = kj[None, :]
    visible = q_seq[:, None] == k_seq[None, :]
    right = 0 if m.causal else m.window_right
    if right >= 0:
        visible &= kj <= diag + right
    if m.window_left >= 0:
        visible &= kj >= diag - m.window_left
    return visible
