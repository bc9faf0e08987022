"""Attention kernels behind one block interface: forward → (out, lse), and its backward.

Shapes: q [Tq, Hq, D], k and v [Tk, Hkv, D] with Hq a multiple of Hkv (GQA, never repeated
before a kernel that handles it); out [Tq, Hq, D] in q's dtype; lse [Hq, Tq] in fp32 (fp64 for
fp64 inputs), −inf on rows that see no key (their output is 0). q and k are the rows the mask
describes (a caller applies `BlockMask.q_rows` / `k_rows` before the call).

Kernels: cuDNN (one dense sequence), torch's flash op (varlen: packed documents, windows), the
CPU flash op and math (any mask). `parallel.attention.dispatch` builds the backend a config names
from them.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod

import torch

from parallel.attention.mask import BlockMask



def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class AttentionBackend(ABC):
    name: str = ""

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]: ...

    @abstractmethod
    def backward(self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, mask: BlockMask,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def plan_lengths(self, shortest: int, longest: int) -> list[int]:
        """One causal sequence length per execution plan the kernel builds and keeps for sequences of
        `shortest` to `longest` tokens (none: it keeps no plans)."""
        return []

    def forward_batched(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense attention of B sequences of equal length: q [B, Lq, Hq, D], k and v [B, Lk, Hkv, D]
        → (out [B, Lq, Hq, D], lse [B, Hq, Lq]). Here one sequence at a time; cuDNN batches."""
        mask = _whole(q.shape[1], k.shape[1], causal, q.device)
        results = [self.forward(q[b], k[b], v[b], mask, scale) for b in range(q.shape[0])]
        return torch.stack([o for o, _ in results]), torch.stack([lse for _, lse in results])

    def backward_batched(self, dout, q, k, v, out, lse, causal: bool, scale: float):
        """The backward of `forward_batched` (lse [B, Hq, Lq]) → dq, dk, dv."""
        mask = _whole(q.shape[1], k.shape[1], causal, q.device)
        grads = [self.backward(dout[b], q[b], k[b], v[b], out[b], lse[b], mask, scale) for b in range(q.shape[0])]
        return tuple(torch.stack(g) for g in zip(*grads))


def _whole(nq: int, nk: int, causal: bool, device: torch.device) -> BlockMask:
    """The mask of one sequence of `nq` queries over `nk` keys."""
    cu = lambda n: torch.tensor([0, n], dtype=torch.int32, device=device)  # noqa: E731
    return BlockMask(cu(nq), cu(nk), nq, nk, causal, q_lengths=(nq,), k_lengths=(nk,))


def _group(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """[T, Hq, D] → [Hkv, G, T, D] so that query head h uses kv head h // G."""
    t, hq, d = q.shape
    return q.view(t, hkv, hq // hkv, d).permute(1, 2, 0, 3)


def _ungroup(x: torch.Tensor) -> torch.Tensor:
    """[Hkv, G, T, D] → [T, Hq, D]."""
    hkv, g, t, d = x.shape
    return x.permute(2, 0, 1, 3).reshape(t, hkv * g, d)


class MathBackend(AttentionBackend):
    """Reference kernel: explicit scores in fp32 (fp64 for fp64 inputs); any mask; any device."""

    name = "math"

    def forward(self, q, k, v, mask, scale):
        acc = lse_dtype(q.dtype)
        hkv = k.shape[1]
        qg = _group(q.to(acc), hkv)  # [Hkv, G, Tq, D]
        kg = k.to(acc).permute(1, 0, 2)[:, None]  # [Hkv, 1, Tk, D]
        vg = v.to(acc).permute(1, 0, 2)[:, None]
        visible = mask.dense()
        scores = (qg @ kg.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)  # [Hkv, G, Tq]; -inf on empty rows
        probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])
        out = probs @ vg
        return _ungroup(out).to(q.dtype), lse.reshape(-1, q.shape[0])

    def backward(self, dout, q, k, v, out, lse, mask, scale):
        acc = lse_dtype(q.dtype)
        hkv = k.shape[1]
        qg = _group(q.to(acc), hkv)
        kg = k.to(acc).permute(1, 0, 2)[:, None]
        vg = v.to(acc).permute(1, 0, 2)[:, None]
        dog = _group(dout.to(acc), hkv)
        og = _group(out.to(acc), hkv)
        lse_g = lse.view(hkv, -1, q.shape[0]).nan_to_num(neginf=0.0)
        scores = (qg @ kg.transpose(-1, -2)) * scale
        probs = torch.exp(scores - lse_g[..., None]).masked_fill(~mask.dense(), 0.0)
        dv = (probs.transpose(-1, -2) @ dog).sum(1)  # [Hkv, Tk, D]
        dprobs = dog @ vg.transpose(-1, -2)
        delta = (dog * og).sum(-1, keepdim=True)
        dscores = probs * (dprobs - delta) * scale
        dq = dscores @ kg
        dk = (dscores.transpose(-1, -2) @ qg).sum(1)
        return (_ungroup(dq).to(q.dtype), dk.permute(1, 0, 2).to(k.dtype), dv.permute(1, 0, 2).to(v.dtype))


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """K/V heads repeated for grouped queries ([..., heads, dim])."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=-2)


def _fold_kv(dx: torch.Tensor, groups: int) -> torch.Tensor:
    """The gradients of repeated K/V heads summed back onto each head ([..., heads, dim])."""
    return dx if groups == 1 else dx.unflatten(-2, (-1, groups)).sum(-2)


class CpuFlashBackend(AttentionBackend):
    """torch's CPU flash kernel with an additive mask (≈ 7–12× the math path on CPU)."""

    name = "cpu_flash"

    @staticmethod
    def _bhtd(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1).unsqueeze(0)

    def forward(self, q, k, v, mask, scale):
        g = q.shape[1] // k.shape[1]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            self._bhtd(q), self._bhtd(_repeat_kv(k, g)), self._bhtd(_repeat_kv(v, g)),
            attn_mask=mask.additive(q.dtype)[None, None], scale=scale)
        out, lse = out[0].transpose(0, 1), lse[0].to(lse_dtype(q.dtype))
        empty = ~mask.dense().any(-1)
        if bool(empty.any()):
            out = out.masked_fill(empty[:, None, None], 0.0)
            lse = lse.masked_fill(empty[None, :], float("-inf"))
        return out, lse

    def backward(self, dout, q, k, v, out, lse, mask, scale):
        g = q.shape[1] // k.shape[1]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            self._bhtd(dout), self._bhtd(q), self._bhtd(_repeat_kv(k, g)), self._bhtd(_repeat_kv(v, g)),
            self._bhtd(out), lse.nan_to_num(neginf=0.0).to(self._lse_kernel_dtype(q)).unsqueeze(0),
            0.0, False, attn_mask=mask.additive(q.dtype)[None, None], scale=scale)
        dq, dk, dv = (x[0].transpose(0, 1) for x in (dq, dk, dv))
        return dq, _fold_kv(dk, g), _fold_kv(dv, g)

    @staticmethod
    def _lse_kernel_dtype(q: torch.Tensor) -> torch.dtype:
        return q.dtype if q.dtype == torch.float64 else torch.float32


class DenseBatched(AttentionBackend):
    """A kernel of dense sequences, `forward_batched` / `backward_batched` over [batch, length, heads,
    dim]; one block is a batch of one (a single dense sequence, as `DocumentRouter` routes)."""

    def forward_batched(self, q, k, v, causal, scale):
        raise NotImplementedError

    def backward_batched(self, dout, q, k, v, out, lse, causal, scale):
        raise NotImplementedError

    def forward(self, q, k, v, mask, scale):
        out, lse = self.forward_batched(q[None], k[None], v[None], mask.causal, scale)
        return out[0], lse[0]

    def backward(self, dout, q, k, v, out, lse, mask, scale):
        return tuple(g[0] for g in self.backward_batched(dout[None], q[None], k[None], v[None], out[None],
                                                         lse[None], mask.causal, scale))


class CpuFlashDense(DenseBatched):
    """torch's CPU flash kernel on dense sequences, batched ([batch, length, heads, dim]), causal
    without a mask, so that it skips the blocks above the diagonal; the dense half of the CPU's
    `DocumentRouter` (whole documents of a micro-batch, each its own sequence)."""

    name = "cpu_flash"

    def forward_batched(self, q, k, v, causal, scale):
        g = q.shape[2] // k.shape[2]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.transpose(1, 2), *(_repeat_kv(x, g).transpose(1, 2) for x in (k, v)), is_causal=causal, scale=scale)
        return out.transpose(1, 2), lse.to(lse_dtype(q.dtype))

    def backward_batched(self, dout, q, k, v, out, lse, causal, scale):
        g = q.shape[2] // k.shape[2]
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.transpose(1, 2), q.transpose(1, 2), *(_repeat_kv(x, g).transpose(1, 2) for x in (k, v)),
            out.transpose(1, 2), lse.to(CpuFlashBackend._lse_kernel_dtype(q)), 0.0, causal, scale=scale)
        return dq.transpose(1, 2), _fold_kv(dk.transpose(1, 2), g), _fold_kv(dv.transpose(1, 2), g)


def _finite_lse_for_kernel(lse: torch.Tensor) -> torch.Tensor:
    """Flash kernels mark rows that see no key with lse = +inf (so exp(s − lse) = 0 in backward)."""
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


class FlashVarlenBackend(AttentionBackend):
    """torch's CUDA flash op with cu_seqlens (packed documents), native GQA and windows."""

    name = "flash"

    def forward(self, q, k, v, mask, scale):
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, mask.cu_q, mask.cu_k, mask.max_q, mask.max_k, 0.0, mask.causal, False, scale=scale,
            window_size_left=mask.window_left, window_size_right=0 if mask.causal else mask.window_right)
        return out, lse.masked_fill(torch.isposinf(lse), float("-inf"))

    def backward(self, dout, q, k, v, out, lse, mask, scale):
        unused = torch.empty(0, device=q.device)
        rng = torch.zeros(2, dtype=torch.int64, device=q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout, q, k, v, out, _finite_lse_for_kernel(lse).contiguous(), mask.cu_q, mask.cu_k, mask.max_q,
            mask.max_k, 0.0, mask.causal, rng, unused, scale=scale,
            window_size_left=mask.window_left, window_size_right=0 if mask.causal else mask.window_right)
        return dq, dk, dv


class CudnnDense(DenseBatched):
    """cuDNN fused attention over dense sequences (≈ 1.8× the flash op on an H200), batched, with
    grouped K/V heads as they are (native GQA). Its causal mask is top-left aligned: causal
    sequences must be square (`parallel.attention.dispatch` routes only such). Nothing of one call
    is kept for another: without dropout the backward's philox seed and offset are unused.

    Plans: with cuDNN's ragged path (`parallel.process_group.CUDNN_ENVIRONMENT`), inputs laid out
    sequence-major share one plan per power-of-two class of lengths, (c/2, c], at ≈ 8% lower speed
    (`benchmarks/results/cudnn_new_length_h200.jsonl`). A plan keeps the strides of the call that
    built it, so every operand of that path, the log-sum-exp included, is sequence-major: strides
    that do not depend on the length. Sequences whose lengths are powers of two (a corpus's
    documents cut at the context length, a ring's equal chunks) go head-major instead, which takes
    cuDNN's exact-shape path: one plan of their own, full speed."""

    name = "cudnn"
    lse_ranks: dict[bool, int] = {}  # the rank of the log-sum-exp each path returns (a constant of the torch build)

    def plan_lengths(self, shortest: int, longest: int) -> list[int]:
        lengths = []
        for c in (1 << k for k in range((shortest - 1).bit_length(), (longest - 1).bit_length() + 1)):
            ragged = max(shortest, c // 2 + 1)
            lengths += ([ragged] if ragged < c and ragged <= longest else []) + ([c] if shortest <= c <= longest else [])
        return lengths

    @staticmethod
    def _exact(q: torch.Tensor, k: torch.Tensor) -> bool:
        return _power_of_two(q.shape[1]) and _power_of_two(k.shape[1])

    @staticmethod
    def _heads_first(x: torch.Tensor, exact: bool) -> torch.Tensor:
        """[B, L, H, D] → [B, H, L, D]: a view (ragged path) or head-major memory (exact path)."""
        return x.transpose(1, 2).contiguous() if exact else x.transpose(1, 2)

    def forward_batched(self, q, k, v, causal, scale):
        exact = self._exact(q, k)
        out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            *(self._heads_first(x, exact) for x in (q, k, v)), None, True, 0.0, causal, False, scale=scale)
        CudnnDense.lse_ranks[exact] = lse.dim()
        return out.transpose(1, 2), lse.reshape(q.shape[0], q.shape[2], q.shape[1])

    def backward_batched(self, dout, q, k, v, out, lse, causal, scale):
        b, lq, hq, _ = q.shape
        exact = self._exact(q, k)
        lse = lse.reshape(b, hq, lq)
        # the ragged path's log-sum-exp is sequence-major like its inputs: a plan built at one length
        # then reads any length of its class with the same strides
        lse = lse.contiguous() if exact else lse.transpose(1, 2).contiguous().transpose(1, 2)
        lse = lse[(...,) + (None,) * (CudnnDense.lse_ranks.get(exact, 3) - 3)]
        seed = offset = torch.zeros((), dtype=torch.int64, device=q.device)  # (no dropout: unused)
        grads = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            *(self._heads_first(x, exact) for x in (dout, q, k, v, out)), lse, seed, offset, None, None, None, lq,
            k.shape[1], 0.0, causal, scale=scale)
        return tuple(g.transpose(1, 2) for g in grads)


# Loom sets cuDNN's ragged path for the whole process and sends exact-shape calls around it on purpose.
warnings.filterwarnings("ignore", message=".*TORCH_CUDNN_SDPA_AVOID_RECOMPILE")


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
