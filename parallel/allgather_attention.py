"""LASP-2H's softmax attention: all-gather every rank's K/V, attend with this rank's queries.

For hybrid models on the contiguous layout (where linear layers pass one state per rank), a
softmax layer gathers K and V from the SP group — padded to the longest slice, since ranks may
hold different numbers of tokens — and each rank attends over the keys of its documents up to
its last token. Backward sums every rank's dK/dV for the keys a rank owns (an all-reduce of the
gathered gradients, then this rank's slice). Bytes grow with L, unlike the ring's overlap; the
gain is one collective instead of d − 1 hops.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from parallel.attention import AttentionBackend, BlockMask, block_attention
from parallel.attention.mask import select_rows
from parallel.ring_comm import COMM_STATS
from parallel.sequence_parallel import SPGroups
from parallel.sp_layout import SequenceLayout


class _GatherRows(torch.autograd.Function):
    """All-gather of [T_r, …] slices of different lengths into [ΣT, …] in rank order."""

    @staticmethod
    def forward(ctx, x, sizes: list[int], rank: int, group):
        longest = max(sizes)
        padded = x.new_zeros((longest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        every = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(every, padded, group=group)
        COMM_STATS["allgather_kv_ops"] += 1
        COMM_STATS["allgather_kv_bytes"] += padded.numel() * padded.element_size()
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return torch.cat([every[r][:n] for r, n in enumerate(sizes)])

    @staticmethod
    def backward(ctx, grad):
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)  # every rank's dK/dV for every key
        start = sum(ctx.sizes[: ctx.rank])
        return total[start: start + ctx.sizes[ctx.rank]], None, None, None


class AllGatherAttention:
    """`attend(q, k, v)` of this rank's slice over all keys of its documents (causal)."""

    def __init__(self, layout: SequenceLayout, groups: SPGroups, backend: AttentionBackend):
        if layout.zigzag or groups.ulysses_size > 1:
            raise ValueError("all-gather attention needs the contiguous layout over a ring of ranks")
        self.layout, self.groups, self.backend = layout, groups, backend
        self.sizes = [int(n) for n in layout.ring_tokens]
        rank = groups.ring_rank
        lo = sum(self.sizes[:rank])
        hi = lo + self.sizes[rank]
        nq, nk, keys = [], [], []
        for ds, de in zip(layout.starts[:-1].tolist(), layout.starts[1:].tolist()):
            a, b = max(ds, lo), min(de, hi)
            if a < b:  # this document's queries here see its keys from its start to b
                nq.append(b - a)
                nk.append(b - ds)
                keys.append(np.arange(ds, b))
        device = layout.device
        cu = lambda n: torch.tensor([0, *np.cumsum(n)], dtype=torch.int32, device=device)  # noqa: E731
        window = layout.window
        self.mask = BlockMask(cu(nq), cu(nk), max(nq, default=0), max(nk, default=0), True,
                              window - 1 if window else -1, 0,
                              None, torch.from_numpy(np.concatenate(keys)).to(device) if keys else None,
                              q_lengths=tuple(nq), k_lengths=tuple(nk))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        g = self.groups
        kv = _GatherRows.apply(torch.stack([k, v], 1).flatten(1), self.sizes, g.ring_rank, g.ring_group)
        kv = kv.view(kv.shape[0], 2, *k.shape[1:])
        if not q.shape[0]:  # no queries here; the output still depends on the gather, so that this rank's
            return torch.zeros_like(q) + 0 * kv.sum()  # backward joins the group's all-reduce like the others
        keys, values = select_rows(kv[:, 0], self.mask.k_rows), select_rows(kv[:, 1], self.mask.k_rows)
        return block_attention(q, keys, values, self.backend, self.mask)
