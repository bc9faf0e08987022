"""How one packed micro-batch is spread over a sequence-parallel group, and what each rank's
queries must see of every other rank's keys.

Two layouts over the R ranks of a ring:
- per-document zigzag (causal attention without a window): every document is cut into 2R chunks
  and ring rank ρ holds chunks ρ and 2R−1−ρ of every document, so each rank does the same
  attention work however the documents are packed. Chunks are ⌈L/2R⌉ long; the last ones may be
  short or empty, so lengths need not divide by 2R.
- contiguous (sliding windows, non-causal attention): ring rank ρ holds one contiguous slice of
  the stream. With a window, work is balanced already and a rank only needs the few ranks before it.
Inside a ring rank, U Ulysses ranks hold contiguous slices of its local stream (SP rank = ρ·U + u).

`block_mask(ρq, ρk)` gives the varlen description (`BlockMask`) of what ring rank ρq's queries see
of ρk's keys, or None; `RingSchedule` turns those needs into hops, skipping blocks that no rank
further along the ring needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from parallel.attention.mask import BlockMask, Rows


def _rows(ranges: list[tuple[int, int]], total: int, device: torch.device) -> Rows:
    """A row selection for the given [start, stop) ranges: None (all), a slice, or an index."""
    ranges = [(a, b) for a, b in ranges if b > a]
    merged: list[list[int]] = []
    for a, b in ranges:
        if merged and merged[-1][1] == a:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    if len(merged) == 1:
        a, b = merged[0]
        return None if (a, b) == (0, total) else slice(a, b)
    if not merged:
        return slice(0, 0)
    return torch.cat([torch.arange(a, b, device=device) for a, b in merged])


def _cu(lengths: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32, device=device)


class SequenceLayout:
    def __init__(self, doc_lengths: list[int], ring: int, ulysses: int = 1, zigzag: bool = True,
                 causal: bool = True, window: int = 0, device: torch.device | str = "cpu"):
        if window and not causal:
            raise ValueError("sliding-window attention is supported with causal attention only")
        if zigzag and (window or not causal):
            zigzag = False  # zigzag balances full causal attention only
        self.lengths = np.asarray(doc_lengths, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)])
        self.total = int(self.starts[-1])
        self.ring, self.ulysses, self.zigzag = ring, ulysses, zigzag
        self.causal, self.window = causal, window
        self.device = torch.device(device)
        if zigzag:
            chunk = -(-self.lengths // (2 * ring))
            def clip(lo: np.ndarray) -> np.ndarray:
                return np.clip(np.minimum(lo + chunk, self.lengths) - lo, 0, None)
            idx = np.arange(ring)[:, None]
            self.first_start = idx * chunk  # [R, docs] offset inside each document
            self.second_start = (2 * ring - 1 - idx) * chunk
            self.first_len = clip(self.first_start)
            self.second_len = clip(self.second_start)
            self.local_len = self.first_len + self.second_len  # [R, docs]
        else:
            bounds = np.array([self.total * r // ring for r in range(ring + 1)])
            lo = np.maximum(self.starts[:-1][None, :], bounds[:-1, None])
            hi = np.minimum(self.starts[1:][None, :], bounds[1:, None])
            self.run_start = lo  # [R, docs] global position
            self.local_len = np.clip(hi - lo, 0, None)
        self.local_offset = np.concatenate([np.zeros((ring, 1), np.int64), np.cumsum(self.local_len, 1)], 1)
        self.ring_tokens = self.local_offset[:, -1]  # [R]
        self.block_mask = lru_cache(maxsize=None)(self._block_mask)

    # ------------------------------------------------------------------ token placement

    def ring_indices(self, rho: int) -> np.ndarray:
        """Global positions held by ring rank ρ, in local order."""
        parts = []
        for i in np.nonzero(self.local_len[rho])[0]:
            base = self.starts[i]
            if self.zigzag:
                a, n = self.first_start[rho, i], self.first_len[rho, i]
                parts.append(np.arange(base + a, base + a + n))
                a, n = self.second_start[rho, i], self.second_len[rho, i]
                parts.append(np.arange(base + a, base + a + n))
            else:
                parts.append(np.arange(self.run_start[rho, i], self.run_start[rho, i] + self.local_len[rho, i]))
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def ulysses_split(self, rho: int) -> list[int]:
        """Token counts of ring rank ρ's local stream held by each of its Ulysses ranks."""
        n, u = int(self.ring_tokens[rho]), self.ulysses
        return [n // u + (1 if j < n % u else 0) for j in range(u)]

    def indices(self, sp_rank: int) -> np.ndarray:
        """Global positions held by one SP rank (ρ·U + u), in local order."""
        rho, u = divmod(sp_rank, self.ulysses)
        split = self.ulysses_split(rho)
        start = sum(split[:u])
        return self.ring_indices(rho)[start: start + split[u]]

    # ------------------------------------------------------------------ visibility

    def _block_mask(self, rq: int, rk: int) -> BlockMask | None:
        if self.zigzag:
            return self._zigzag_mask(rq, rk)
        return self._contiguous_mask(rq, rk)

    def _make(self, q_ranges, k_ranges, nq, nk, rq, rk, causal, left=-1, right=-1) -> BlockMask | None:
        if not nq:
            return None
        return BlockMask(_cu(nq, self.device), _cu(nk, self.device), max(nq), max(nk), causal, left, right,
                         _rows(q_ranges, int(self.ring_tokens[rq]), self.device),
                         _rows(k_ranges, int(self.ring_tokens[rk]), self.device),
                         q_lengths=tuple(int(n) for n in nq), k_lengths=tuple(int(n) for n in nk))

    def _zigzag_mask(self, rq: int, rk: int) -> BlockMask | None:
        oq, ok = self.local_offset[rq], self.local_offset[rk]
        nq_all, nk_all = self.local_len[rq], self.local_len[rk]
        fq, fk = self.first_len[rq], self.first_len[rk]
        q_ranges, k_ranges, nq, nk = [], [], [], []
        for i in range(self.lengths.size):
            if rq == rk:  # own chunks: causal over [first | second] is exact
                q = (oq[i], oq[i] + nq_all[i])
                k = q
                causal = True
            elif rk < rq:  # earlier rank: all my queries see its first chunk
                q, k = (oq[i], oq[i] + nq_all[i]), (ok[i], ok[i] + fk[i])
                causal = False
            else:  # later rank: only my second chunk sees it, all of it
                q, k = (oq[i] + fq[i], oq[i] + nq_all[i]), (ok[i], ok[i] + nk_all[i])
                causal = False
            if q[1] > q[0] and k[1] > k[0]:
                q_ranges.append(q)
                k_ranges.append(k)
                nq.append(q[1] - q[0])
                nk.append(k[1] - k[0])
        return self._make(q_ranges, k_ranges, nq, nk, rq, rk, causal)

    def _contiguous_mask(self, rq: int, rk: int) -> BlockMask | None:
        oq, ok = self.local_offset[rq], self.local_offset[rk]
        lq, lk = self.local_len[rq], self.local_len[rk]
        docs = np.nonzero((lq > 0) & (lk > 0))[0]
        if rq == rk:
            left = self.window - 1 if self.window else -1
            n = [int(lq[i]) for i in docs]
            ranges = [(oq[i], oq[i] + lq[i]) for i in docs]
            return self._make(ranges, ranges, n, n, rq, rk, self.causal, left, 0 if self.causal else left)
        if not self.causal:
            q_ranges = [(oq[i], oq[i] + lq[i]) for i in docs]
            k_ranges = [(ok[i], ok[i] + lk[i]) for i in docs]
            return self._make(q_ranges, k_ranges, [int(lq[i]) for i in docs], [int(lk[i]) for i in docs],
                              rq, rk, False)
        if rk > rq or docs.size == 0:
            return None
        (i,) = docs  # ranks apart share at most the one document that spans the gap between them
        qa, qb = self.run_start[rq, i], self.run_start[rq, i] + lq[i]
        ka, kb = self.run_start[rk, i], self.run_start[rk, i] + lk[i]
        if not self.window:
            return self._make([(oq[i], oq[i] + lq[i])], [(ok[i], ok[i] + lk[i])], [int(lq[i])], [int(lk[i])],
                              rq, rk, False)
        q_stop = min(qb, kb + self.window - 1)  # queries beyond this see none of these keys
        k_start = max(ka, qa - self.window + 1)  # keys before this are outside every query's window
        if q_stop <= qa or k_start >= kb:
            return None
        m, nk = int(q_stop - qa), int(kb - k_start)
        right = int(q_stop - kb)  # flash's bottom-right diagonal sits this far left of the causal edge
        left = self.window - 1 - right
        return self._make([(oq[i], oq[i] + m)], [(ok[i] + k_start - ka, ok[i] + lk[i])], [m], [nk],
                          rq, rk, False, left, right)

    def needs(self) -> np.ndarray:
        """[R, R] bool: ring rank ρq's queries see some key of ring rank ρk."""
        return np.array([[self.block_mask(q, k) is not None for k in range(self.ring)] for q in range(self.ring)])


@dataclass(frozen=True)
class Channel:
    """One direction round the ring: +1 receives from ρ−1 (blocks of earlier ranks), −1 from ρ+1."""

    step: int
    ring: int
    hops: int  # hops this channel makes
    last_needed: tuple[int, ...]  # per source rank: the last hop at which some rank needs its block

    def source(self, rho: int, hop: int) -> int:
        """The rank whose block ρ holds after `hop` hops on this channel."""
        return (rho - self.step * hop) % self.ring

    def alive(self, source: int, hop: int) -> bool:
        """Whether the block of `source` is still sent at `hop` (someone at this hop or later needs it)."""
        return 1 <= hop <= self.last_needed[source]


class RingSchedule:
    """Which block each rank receives at each hop, per direction, and which blocks stop early.

    A unidirectional ring brings the R−1 remote blocks one hop at a time from ρ−1. The
    bidirectional ring (TokenRing) brings the blocks of distance ≤ ⌈(R−1)/2⌉ from ρ−1 and the
    rest from ρ+1, both directions at once, so it needs about half the hops.
    """

    def __init__(self, needs: np.ndarray, bidirectional: bool):
        ring = needs.shape[0]
        self.ring = ring
        forward_span = -(-(ring - 1) // 2) if bidirectional else ring - 1
        spans = [(+1, forward_span), (-1, ring - 1 - forward_span)]
        self.channels = []
        for step, span in spans:
            last = []
            for s in range(ring):
                hops = [h for h in range(1, span + 1) if needs[(s + step * h) % ring, s]]
                last.append(max(hops, default=0))
            channel = Channel(step, ring, max(last, default=0), tuple(last))
            if channel.hops:
                self.channels.append(channel)
        self.hops = max((c.hops for c in self.channels), default=0)
