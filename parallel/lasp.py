"""Sequence parallelism for linear attention: LASP-2 (one all-gather of memory states) and LASP-1
(states passed rank to rank), over contiguous slices of a packed sequence.

Each rank computes, from its own tokens only, its output without incoming state, the state it
hands on, M_r = Σ_j λ^(n−1−j) k_jᵀ v_j over its last document, and the factor a state passing
through it keeps, Λ_r = λ^n (0 when a document starts in it). LASP-2 all-gathers (M, log Λ,
starts-a-document) of every rank in one collective; each rank folds the earlier ranks' states,
S ← Λ_s S + M_s, into the state entering it (zero if its first token starts a document) and adds
λ^(i+1) q_i S_in to its outputs. Backward all-gathers each rank's dS_in and sums, for its own M,
the later ranks' dS_in decayed by the Λ between: one all-gather each way, bytes independent of
the sequence length. LASP-1 computes the same states in a chain of sends and receives.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from parallel import linear_attention as la
from parallel.choices import LinearSPMethod
from parallel.ring_comm import COMM_STATS
from parallel.sequence_parallel import SPGroups
from parallel.sp_layout import SequenceLayout

def _gather(x: torch.Tensor, group: dist.ProcessGroup, world: int, kind: str) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    out = torch.stack(parts)
    COMM_STATS[f"{kind}_ops"] += 1
    COMM_STATS[f"{kind}_bytes"] += x.numel() * x.element_size()
    return out


class _Lasp2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state, log_pass, first_starts: bool, group, rank: int, world: int):
        flag = torch.tensor([1.0 if first_starts else 0.0], dtype=state.dtype, device=state.device)
        packed = torch.cat([state.flatten(), log_pass.to(state.dtype), flag])
        every = _gather(packed, group, world, "lasp2")
        n = state.numel()
        states = every[:, :n].view(world, *state.shape)
        passes = torch.exp(every[:, n: n + log_pass.numel()])[:, :, None, None]  # [world, H, 1, 1]
        keeps = 1.0 - every[:, -1]  # the rank's first token continues a document
        entering = torch.zeros_like(state)
        for s in range(rank):
            entering = passes[s] * entering + states[s]
        ctx.save_for_backward(passes, keeps)
        ctx.group, ctx.rank, ctx.world = group, rank, world
        return entering * keeps[rank]

    @staticmethod
    def backward(ctx, grad_entering):
        passes, keeps = ctx.saved_tensors
        every = _gather(grad_entering, ctx.group, ctx.world, "lasp2_grad")
        grad_state = torch.zeros_like(grad_entering)
        carry = torch.ones_like(passes[0])
        for r in range(ctx.rank + 1, ctx.world):  # later ranks' dS_in, decayed by the ranks between
            grad_state = grad_state + carry * keeps[r] * every[r]
            carry = carry * passes[r]
        return grad_state, None, None, None, None, None


class _Lasp1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, state, log_pass, first_starts: bool, group, rank: int, world: int):
        previous = torch.zeros_like(state)
        if rank > 0:
            dist.recv(previous, dist.get_global_rank(group, rank - 1), group=group)
        passes = torch.exp(log_pass.to(state.dtype))[:, None, None]
        if rank < world - 1:
            handing_on = passes * previous + state
            dist.send(handing_on.contiguous(), dist.get_global_rank(group, rank + 1), group=group)
            COMM_STATS["lasp1_ops"] += 1
            COMM_STATS["lasp1_bytes"] += handing_on.numel() * handing_on.element_size()
        keep = 0.0 if first_starts else 1.0
        ctx.save_for_backward(passes)
        ctx.keep, ctx.group, ctx.rank, ctx.world = keep, group, rank, world
        return previous * keep

    @staticmethod
    def backward(ctx, grad_entering):
        (passes,) = ctx.saved_tensors
        grad_out = torch.zeros_like(grad_entering)  # dL/d(state this rank hands on)
        if ctx.rank < ctx.world - 1:
            dist.recv(grad_out, dist.get_global_rank(ctx.group, ctx.rank + 1), group=ctx.group)
        if ctx.rank > 0:
            grad_previous = ctx.keep * grad_entering + passes * grad_out
            dist.send(grad_previous.contiguous(), dist.get_global_rank(ctx.group, ctx.rank - 1), group=ctx.group)
            COMM_STATS["lasp1_grad_ops"] += 1
            COMM_STATS["lasp1_grad_bytes"] += grad_previous.numel() * grad_previous.element_size()
        return grad_out, None, None, None, None, None


def local_starts(layout: SequenceLayout, rank: int, device: torch.device | str) -> la.Segments:
    """Which of the ring rank's tokens start a document."""
    positions = layout.ring_indices(rank)
    starts = torch.from_numpy(np.isin(positions, layout.starts[:-1]))
    return la.Segments(starts.to(device))


class LocalLinearAttention:
    """Linear attention over the documents of a micro-batch held whole on this rank."""

    def __init__(self, cu_seqlens: torch.Tensor, chunk: int = 256):
        starts = torch.zeros(int(cu_seqlens[-1]), dtype=torch.bool, device=cu_seqlens.device)
        starts[cu_seqlens[:-1].long()] = True
        self.seg, self.chunk = la.Segments(starts), chunk

    def __call__(self, q, k, v, log_decay):
        return la.local(q, k, v, log_decay, self.seg, self.chunk)


class SequenceParallelLinear:
    """Linear attention of this rank's contiguous slice, with the states of the ranks before it."""

    def __init__(self, layout: SequenceLayout, groups: SPGroups, method: LinearSPMethod = "lasp2", chunk: int = 256):
        if layout.zigzag or groups.ulysses_size > 1:
            raise ValueError("linear-attention SP needs the contiguous layout over a ring of ranks")
        self.groups, self.method, self.chunk = groups, method, chunk
        self.seg = local_starts(layout, groups.ring_rank, layout.device)

    def __call__(self, q, k, v, log_decay):
        g = self.groups
        seg = self.seg
        out = la.local(q, k, v, log_decay, seg, self.chunk)
        state = la.outgoing(k, v, log_decay, seg)
        log_pass = la.passes_through(log_decay, seg, q.shape[0]).to(state.device)
        fn = _Lasp2 if self.method == "lasp2" else _Lasp1
        entering = fn.apply(state, log_pass, seg.first_is_start, g.ring_group, g.ring_rank, g.ring_size)
        return out + la.incoming(q, entering, log_decay, seg)
