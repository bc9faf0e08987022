"""Causal linear attention with per-head decay, computed chunkwise, over packed documents.

Per K/V head, with decay λ ∈ (0, 1] (λ = 1: plain linear attention) and feature map φ:

    S_t = λ · S_{t−1} + φ(k_t)ᵀ v_t        o_t = φ(q_t) · S_t        (S resets at a document's start)

Chunkwise: inside a chunk, o = ((Q Kᵀ) ⊙ D) V with D_ij = λ^(i−j) for j ≤ i in the same document,
plus the decayed state entering the chunk; the chunk then hands on λ^C·S + Σ_j λ^(C−1−j) k_jᵀ v_j.
All of it in fp32. The same algebra splits a sequence over ranks (`parallel.lasp`): a rank's output
is `local(q, k, v)` (no incoming state) plus `incoming(q, S_in)`, and it hands on `outgoing(k, v)`.
GQA: query heads h·G … h·G+G−1 read the state of K/V head h (states are per K/V head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FEATURE_MAPS = {
    "identity": lambda x: x,
    "elu": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
    "silu": F.silu,
}


def decay_rates(n_heads: int, enabled: bool) -> torch.Tensor:
    """log λ per head: RetNet's λ_h = 1 − 2^(−5 − 8h/H) when enabled (slow to fast forgetting), else 0."""
    if not enabled:
        return torch.zeros(n_heads)
    return torch.log1p(-torch.pow(2.0, -5.0 - 8.0 * torch.arange(n_heads) / max(1, n_heads)))


@dataclass
class Segments:
    """Where documents start in a rank's local tokens (positions 0..n−1)."""

    starts: torch.Tensor  # [n] bool: the token starts a document

    def doc_ids(self) -> torch.Tensor:
        return torch.cumsum(self.starts.to(torch.int64), 0)

    @property
    def first_is_start(self) -> bool:
        return bool(self.starts[0]) if self.starts.numel() else True

    @property
    def any_start(self) -> bool:
        return bool(self.starts.any())

    def reach(self) -> torch.Tensor:
        """[n] bool: no document starts at or before this token (the incoming state still reaches it)."""
        return torch.cumsum(self.starts.to(torch.int64), 0) == 0

    def tail(self) -> torch.Tensor:
        """[n] bool: no document starts after this token (it feeds the outgoing state)."""
        after = torch.flip(torch.cumsum(torch.flip(self.starts.to(torch.int64), [0]), 0), [0]) - self.starts.to(torch.int64)
        return after == 0


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[T, Hq, D] → [Hkv, G, T, D]."""
    t, h, d = x.shape
    return x.view(t, kv_heads, h // kv_heads, d).permute(1, 2, 0, 3)


def local(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, seg: Segments,
          chunk: int = 256) -> torch.Tensor:
    """Output of this rank's tokens with no incoming state. q [T,Hq,Dk], k [T,Hkv,Dk], v [T,Hkv,Dv],
    log_decay [Hkv]; fp32 accumulation; returns [T, Hq, Dv] in q's dtype."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    t, hq, _ = q.shape
    hkv, dv = k.shape[1], v.shape[2]
    qg = _grouped(q.to(acc), hkv)  # [Hkv, G, T, Dk]
    kg = k.to(acc).permute(1, 0, 2)  # [Hkv, T, Dk]
    vg = v.to(acc).permute(1, 0, 2)  # [Hkv, T, Dv]
    lam = log_decay.to(device=q.device, dtype=acc)[:, None, None]  # [Hkv, 1, 1]
    docs = seg.doc_ids()
    state = torch.zeros(hkv, kg.shape[-1], dv, dtype=acc, device=q.device)
    outs = []
    for a in range(0, t, chunk):
        b = min(t, a + chunk)
        idx = torch.arange(b - a, device=q.device, dtype=acc)
        same = docs[a:b, None] == docs[None, a:b]
        causal = idx[:, None] >= idx[None, :]
        gap = (idx[:, None] - idx[None, :]).clamp_min(0)
        d_mat = torch.where(same & causal, torch.exp(lam * gap), torch.zeros((), dtype=acc, device=q.device))
        scores = qg[:, :, a:b] @ kg[:, None, a:b].transpose(-1, -2)  # [Hkv, G, C, C]
        out = (scores * d_mat[:, None]) @ vg[:, None, a:b]
        chunk_seg = Segments(seg.starts[a:b])
        reach = chunk_seg.reach().to(acc)  # rows the state from before the chunk still reaches
        into = torch.exp(lam * (idx + 1)[None, :, None]) * reach[None, :, None]  # [Hkv, C, 1]
        out = out + (qg[:, :, a:b] * into[:, None]) @ state[:, None]
        outs.append(out)
        tail = chunk_seg.tail().to(acc)
        weight = torch.exp(lam * (b - a - 1 - idx)[None, :, None]) * tail[None, :, None]  # [Hkv, C, 1]
        passes = 0.0 if chunk_seg.any_start else torch.exp(lam * (b - a))
        state = passes * state + (kg[:, a:b] * weight).transpose(-1, -2) @ vg[:, a:b]
    out = torch.cat(outs, dim=2) if outs else qg.new_zeros(hkv, hq // hkv, 0, dv)
    return out.permute(2, 0, 1, 3).reshape(t, hq, dv).to(q.dtype)


def outgoing(k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, seg: Segments) -> torch.Tensor:
    """The state this rank hands on (fp32 [Hkv, Dk, Dv]): Σ_j λ^(n−1−j) k_jᵀ v_j over its last document."""
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    t = k.shape[0]
    idx = torch.arange(t, device=k.device, dtype=acc)
    weight = torch.exp(log_decay.to(device=k.device, dtype=acc)[:, None] * (t - 1 - idx)[None, :]) * seg.tail().to(acc)
    return torch.einsum("ht,thk,thv->hkv", weight, k.to(acc), v.to(acc))


def passes_through(log_decay: torch.Tensor, seg: Segments, length: int) -> torch.Tensor:
    """log of the factor a state entering this rank keeps on leaving it (−inf: a document starts here)."""
    dtype = torch.promote_types(log_decay.dtype, torch.float32)
    if seg.any_start:
        return torch.full_like(log_decay, -math.inf, dtype=dtype)
    return log_decay.to(dtype) * length


def incoming(q: torch.Tensor, state: torch.Tensor, log_decay: torch.Tensor, seg: Segments) -> torch.Tensor:
    """What the state entering this rank adds to each output: λ^(i+1) φ(q_i) S_in until a document starts."""
    acc = state.dtype
    t, hq, _ = q.shape
    hkv = state.shape[0]
    idx = torch.arange(t, device=q.device, dtype=acc)
    into = torch.exp(log_decay.to(device=q.device, dtype=acc)[:, None] * (idx + 1)[None, :]) * seg.reach().to(acc)
    out = (_grouped(q.to(acc), hkv) * into[:, None, :, None]) @ state[:, None]
    return out.permute(2, 0, 1, 3).reshape(t, hq, state.shape[-1]).to(q.dtype)
