"""Ring attention: each rank keeps its queries and receives the other ranks' K/V one hop at a time.

Forward, at ring rank ρ: post the first hop's send/recv, compute the local block, then per hop
wait for the incoming K/V, post the next hop (double buffering: the next block travels while
this one computes), compute this block and merge it into a running (out, lse) in fp32 with the
overflow-safe rule

    out −= sigmoid(lse_b − lse) · (out − out_b);    lse −= logsigmoid(lse − lse_b)

so only one partial output exists whatever the degree. Rows that have seen no key yet
(lse = −inf) take the block's values. Only K/V heads travel (GQA), packed K and V in one buffer.

Backward: K/V travel again; every rank adds its contribution to the dK/dV accumulator (fp32) of
the block it holds and passes the accumulator on one hop behind the K/V; after the last hop each
accumulator goes straight home. Blocks that no rank further along needs stop travelling (zero-
size sends are skipped on both sides, decided from the same schedule). The bidirectional variant
runs two such channels at once in opposite directions (see `RingSchedule`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.attention.backends import AttentionBackend
from parallel.attention.mask import BlockMask, Rows, select_rows
from parallel.ring_comm import Exchange
from parallel.sp_layout import Channel, RingSchedule, SequenceLayout


def merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor,
          block_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The running fp32 (out [T,H,D], lse [H,T]) merged with a block's, overflow-safe."""
    weight = torch.sigmoid(block_lse - lse).nan_to_num(0.0)  # both −inf: nothing seen yet, nothing new
    out = out - weight.transpose(0, 1).unsqueeze(-1) * (out - block_out)
    merged = lse - F.logsigmoid(lse - block_lse)
    return out, torch.where(torch.isneginf(lse), block_lse, merged)


_fused_merge = None


def merge_(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """In-place `merge`; on CUDA one compiled kernel (a few passes over fp32 [T,H,D] otherwise)."""
    global _fused_merge
    fn = merge
    if out.is_cuda:
        if _fused_merge is None:
            _fused_merge = torch.compile(merge, dynamic=True)
        fn = _fused_merge
    new_out, new_lse = fn(out, lse, block_out, block_lse)
    out.copy_(new_out)
    lse.copy_(new_lse)


def _merge_rows_(out: torch.Tensor, lse: torch.Tensor, rows: Rows, block_out: torch.Tensor,
                 block_lse: torch.Tensor) -> None:
    if rows is None or isinstance(rows, slice):
        sl = rows if rows is not None else slice(None)
        merge_(out[sl], lse[:, sl], block_out, block_lse)
        return
    o, l = out.index_select(0, rows), lse.index_select(1, rows)
    merge_(o, l, block_out, block_lse)
    out.index_copy_(0, rows, o)
    lse.index_copy_(1, rows, l)


def _add_rows_(acc: torch.Tensor, rows: Rows, value: torch.Tensor) -> None:
    if rows is None:
        acc.add_(value)
    elif isinstance(rows, slice):
        acc[rows].add_(value)
    else:
        acc.index_add_(0, rows, value.to(acc.dtype))


@dataclass
class RingContext:
    """What the ring needs for one micro-batch: layout, this rank's place, groups and kernel."""

    layout: SequenceLayout
    rank: int  # ring rank ρ
    group: dist.ProcessGroup | None
    reverse_group: dist.ProcessGroup | None
    backend: AttentionBackend
    bidirectional: bool = False

    def __post_init__(self):
        self.size = self.layout.ring
        self.schedule = RingSchedule(self.layout.needs(), self.bidirectional)

    def mask(self, source: int) -> BlockMask | None:
        return self.layout.block_mask(self.rank, source)

    def tokens(self, source: int) -> int:
        return int(self.layout.ring_tokens[source])

    def exchange(self) -> Exchange:
        return Exchange(self.group, self.reverse_group)

    def neighbours(self, channel: Channel) -> tuple[int, int]:
        """(rank sent to, rank received from) on this channel."""
        return (self.rank + channel.step) % self.size, (self.rank - channel.step) % self.size


def _post_kv(ring: RingContext, hop: int, held: dict, like: torch.Tensor) -> tuple[Exchange, dict]:
    """Sends each channel's held K/V block on and receives the next (hop `hop`)."""
    ex, incoming = ring.exchange(), {}
    for ch in ring.schedule.channels:
        if hop > ch.hops:
            continue
        to, frm = ring.neighbours(ch)
        if held.get(ch) is not None and ch.alive(ch.source(ring.rank, hop - 1), hop):
            ex.send(held[ch], to, ch.step, "kv")
        src = ch.source(ring.rank, hop)
        if ch.alive(src, hop):
            buf = like.new_empty((2, ring.tokens(src), *like.shape[2:]))
            incoming[ch] = ex.recv(buf, frm, ch.step)
    return ex.start(), incoming


def ring_forward(q: torch.Tensor, kv: torch.Tensor, ring: RingContext, scale: float):
    acc_dtype = torch.float32 if q.dtype != torch.float64 else q.dtype
    state: dict[str, torch.Tensor] = {}

    def compute(source: int, block: torch.Tensor) -> None:
        mask = ring.mask(source)
        if mask is None:
            return
        k, v = select_rows(block[0], mask.k_rows), select_rows(block[1], mask.k_rows)
        block_out, block_lse = ring.backend.forward(select_rows(q, mask.q_rows), k, v, mask, scale)
        if not state and mask.q_rows is None:  # the first block covering every row needs no merge
            state["out"], state["lse"] = block_out.to(acc_dtype), block_lse.to(acc_dtype).contiguous()
            return
        if not state:
            state["out"] = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
            state["lse"] = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc_dtype, device=q.device)
        _merge_rows_(state["out"], state["lse"], mask.q_rows, block_out, block_lse)

    held = {ch: kv for ch in ring.schedule.channels}
    pending, incoming = _post_kv(ring, 1, held, kv)
    compute(ring.rank, kv)
    for hop in range(1, ring.schedule.hops + 1):
        pending.wait()
        held = incoming
        if hop < ring.schedule.hops:
            pending, incoming = _post_kv(ring, hop + 1, held, kv)
        for ch, block in held.items():
            compute(ch.source(ring.rank, hop), block)
    if not state:  # this rank holds no query that sees any key (e.g. no tokens at all)
        return (torch.zeros_like(q),
                torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc_dtype, device=q.device))
    return state["out"].to(q.dtype), state["lse"]


def ring_backward(dout, q, kv, out, lse, ring: RingContext, scale: float):
    acc_dtype = torch.float32 if q.dtype != torch.float64 else q.dtype
    dq = torch.zeros(q.shape, dtype=acc_dtype, device=q.device)
    own = torch.zeros(kv.shape, dtype=acc_dtype, device=q.device)  # dK, dV of this rank's block

    def grads(source: int, block: torch.Tensor) -> torch.Tensor | None:
        """Adds to dq; returns this rank's contribution to the block's dK/dV (fp32) or None."""
        mask = ring.mask(source)
        if mask is None:
            return None
        k, v = select_rows(block[0], mask.k_rows), select_rows(block[1], mask.k_rows)
        sel = lambda x: select_rows(x, mask.q_rows)  # noqa: E731
        lse_rows = lse if mask.q_rows is None else (lse[:, mask.q_rows] if isinstance(mask.q_rows, slice)
                                                       else lse.index_select(1, mask.q_rows))
        bdq, bdk, bdv = ring.backend.backward(sel(dout), sel(q), k, v, sel(out), lse_rows, mask, scale)
        _add_rows_(dq, mask.q_rows, bdq)
        if mask.k_rows is None:
            return torch.stack((bdk, bdv)).to(acc_dtype)
        contrib = torch.zeros((2, *block.shape[1:]), dtype=acc_dtype, device=q.device)
        _add_rows_(contrib[0], mask.k_rows, bdk)
        _add_rows_(contrib[1], mask.k_rows, bdv)
        return contrib

    channels = ring.schedule.channels
    held = {ch: kv for ch in channels}
    pending_kv, incoming_kv = _post_kv(ring, 1, held, kv)
    mine = grads(ring.rank, kv)
    if mine is not None:
        own += mine
    pending_acc, incoming_acc = ring.exchange(), {}
    finished: list[tuple[torch.Tensor, int, Channel]] = []  # complete accumulators to send home
    for hop in range(1, ring.schedule.hops + 1):
        pending_kv.wait()
        held = incoming_kv
        if hop < ring.schedule.hops:
            pending_kv, incoming_kv = _post_kv(ring, hop + 1, held, kv)
        contribs = {ch: grads(ch.source(ring.rank, hop), block) for ch, block in held.items()}
        pending_acc.wait()
        pending_acc, arrived, incoming_acc = ring.exchange(), incoming_acc, {}
        for ch in channels:
            nxt = ch.source(ring.rank, hop + 1)
            if ch in held:
                src = ch.source(ring.rank, hop)
                acc = arrived.get(ch)
                if contribs[ch] is not None:
                    acc = contribs[ch] if acc is None else acc.add_(contribs[ch])
                if acc is None:
                    acc = torch.zeros((2, *held[ch].shape[1:]), dtype=acc_dtype, device=q.device)
                if ch.alive(src, hop + 1):
                    to, _ = ring.neighbours(ch)
                    pending_acc.send(acc, to, ch.step, "dkv")
                else:  # nobody further along needs this block: its accumulator is complete
                    finished.append((acc, src, ch))
            if hop + 1 <= ch.hops and ch.alive(nxt, hop + 1):
                _, frm = ring.neighbours(ch)
                buf = torch.empty((2, ring.tokens(nxt), *kv.shape[2:]), dtype=acc_dtype, device=q.device)
                incoming_acc[ch] = pending_acc.recv(buf, frm, ch.step)
        pending_acc.start()
    pending_acc.wait()
    home = ring.exchange()
    for acc, src, ch in finished:
        home.send(acc, src, ch.step, "dkv_home")
    returned = []
    for ch in channels:
        last = ch.last_needed[ring.rank]
        if last:
            holder = (ring.rank + ch.step * last) % ring.size
            returned.append(home.recv(torch.empty_like(own), holder, ch.step))
    home.start().wait()
    for acc in returned:
        own += acc
    return dq.to(q.dtype), own[0].to(q.dtype), own[1].to(q.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: RingContext):
        scale = q.shape[-1] ** -0.5
        kv = torch.stack([k, v])
        out, lse = ring_forward(q, kv, ring, scale)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.ring, ctx.scale = ring, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, kv, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.contiguous(), q, kv, out, lse, ctx.ring, ctx.scale)
        return dq, dk, dv, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: RingContext) -> torch.Tensor:
    """Exact attention of this rank's queries over the whole (sharded) sequence."""
    return _RingAttention.apply(q, k, v, ring)
