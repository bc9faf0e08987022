"""Which kernel runs what: the backend a name selects, and how the cuDNN backend serves packed blocks.

cuDNN's fused kernel is the fastest on dense sequences; torch's flash varlen op takes any packing
but runs at about 60% of cuDNN's speed on an H200 on long documents (and faster than a cuDNN call
per document below about 4K tokens: the profile's `dense_min_tokens`).
`DocumentRouter` gets both. Each document of a block long enough to matter (`dense_min` queries
and keys, causal ones square) goes to the dense kernel in a call of its own, its rows a slice of
the block; the rest go together to one varlen call. The result is exactly the per-document
attention either kernel alone computes. One document per call keeps cuDNN's plans few: they are
keyed on the batch size and on the power-of-two class of the length (`parallel.process_group`
sets cuDNN's ragged path), so a process meets at most one plan per class, which `plan_lengths`
names and `parallel.attention.warm_up` builds before the first step. (Batching documents of one
length, or padding documents to a few lengths, was measured slower on an H200: every new batch size
cost a plan, and gathers cost more than new shapes do.) Sequence lengths come from the host
(`BlockMask.q_lengths`, or a one-sequence block's `max_q`); a block's routing is worked out once and
kept with its mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from parallel.attention.backends import (AttentionBackend, CpuFlashBackend, CpuFlashDense, CudnnDense,
                                         FlashVarlenBackend, MathBackend, lse_dtype)
from parallel.attention.mask import BlockMask, Rows, select_rows
from parallel.choices import CUDA_BACKENDS
from parallel.planner.hardware import HardwareProfile


@dataclass
class Route:
    documents: list[tuple[slice, slice]]  # each long document's query and key rows, one dense call each
    rest: BlockMask | None  # what the packed kernel takes, and its rows
    q_rows: Rows = None
    k_rows: Rows = None


class DocumentRouter(AttentionBackend):
    """Each document of a block of `dense_min` tokens or more to `dense` in a call of its own, the
    rest to `packed` in one call."""

    def __init__(self, dense: AttentionBackend, packed: AttentionBackend,
                 dense_min: int = HardwareProfile.dense_min_tokens):
        self.dense, self.packed, self.dense_min = dense, packed, dense_min
        self.name = dense.name

    def route(self, mask: BlockMask) -> Route | None:
        """How a block splits (kept with its mask), or None when it all goes to `packed`."""
        key = ("route", self.dense_min)
        if key not in mask.cache:
            mask.cache[key] = self._route(mask)
        return mask.cache[key]

    def _route(self, mask: BlockMask) -> Route | None:
        if mask.window_left >= 0 or (not mask.causal and mask.window_right >= 0):
            return None
        if mask.q_lengths is not None:
            nq, nk = np.asarray(mask.q_lengths), np.asarray(mask.k_lengths)
        elif mask.num_sequences == 1:  # (its lengths are its longest)
            nq, nk = np.asarray([mask.max_q]), np.asarray([mask.max_k])
        else:
            return None
        long = (nq >= self.dense_min) & (nk >= self.dense_min) & ((nq == nk) | (not mask.causal))
        if not long.any():
            return None
        oq, ok = np.concatenate([[0], np.cumsum(nq)]), np.concatenate([[0], np.cumsum(nk)])
        device = mask.cu_q.device
        documents = [(slice(int(oq[d]), int(oq[d + 1])), slice(int(ok[d]), int(ok[d + 1])))
                     for d in np.nonzero(long)[0]]
        rest = np.nonzero(~long)[0]
        if not rest.size:
            return Route(documents, None)
        sub = BlockMask(_cu(nq[rest], device), _cu(nk[rest], device), int(nq[rest].max()), int(nk[rest].max()),
                        mask.causal, q_lengths=tuple(nq[rest].tolist()), k_lengths=tuple(nk[rest].tolist()))
        return Route(documents, sub, _rows(oq, rest, device), _rows(ok, rest, device))

    def plan_lengths(self, shortest: int, longest: int) -> list[int]:
        return self.dense.plan_lengths(max(shortest, self.dense_min), longest)

    def forward(self, q, k, v, mask, scale):
        route = self.route(mask)
        if route is None:
            return self.packed.forward(q, k, v, mask, scale)
        out = torch.empty_like(q)
        lse = torch.empty((q.shape[1], q.shape[0]), dtype=lse_dtype(q.dtype), device=q.device)
        for q_rows, k_rows in route.documents:
            o, l = self.dense.forward_batched(q[None, q_rows], k[None, k_rows], v[None, k_rows], mask.causal, scale)
            out[q_rows] = o[0]
            lse[:, q_rows] = l[0].to(lse.dtype)
        if route.rest is not None:
            o, l = self.packed.forward(select_rows(q, route.q_rows), select_rows(k, route.k_rows),
                                       select_rows(v, route.k_rows), route.rest, scale)
            _put(out, route.q_rows, o)
            _put(lse.transpose(0, 1), route.q_rows, l.transpose(0, 1).to(lse.dtype))
        return out, lse

    def backward(self, dout, q, k, v, out, lse, mask, scale):
        route = self.route(mask)
        if route is None:
            return self.packed.backward(dout, q, k, v, out, lse, mask, scale)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        rows_lse = lse.transpose(0, 1)  # [T, H]
        for q_rows, k_rows in route.documents:
            grads = self.dense.backward_batched(dout[None, q_rows], q[None, q_rows], k[None, k_rows],
                                                v[None, k_rows], out[None, q_rows],
                                                lse[None, :, q_rows].contiguous(), mask.causal, scale)
            for full, rows, grad in zip((dq, dk, dv), (q_rows, k_rows, k_rows), grads):
                full[rows] = grad[0]
        if route.rest is not None:
            rest_lse = select_rows(rows_lse, route.q_rows).transpose(0, 1).contiguous()
            grads = self.packed.backward(*(select_rows(x, route.q_rows) for x in (dout, q)),
                                         select_rows(k, route.k_rows), select_rows(v, route.k_rows),
                                         select_rows(out, route.q_rows), rest_lse, route.rest, scale)
            for full, rows, grad in zip((dq, dk, dv), (route.q_rows, route.k_rows, route.k_rows), grads):
                _put(full, rows, grad)
        return dq, dk, dv


def _to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device, copied without waiting for the device's queue (pinned memory)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def _cu(lengths: np.ndarray, device: torch.device) -> torch.Tensor:
    return _to_device(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), device)


def _rows(offsets: np.ndarray, docs: np.ndarray, device: torch.device) -> Rows:
    """The rows of these documents: a slice when they are adjacent, else an index."""
    if np.all(np.diff(docs) == 1):
        return slice(int(offsets[docs[0]]), int(offsets[docs[-1] + 1]))
    return _to_device(np.concatenate([np.arange(offsets[d], offsets[d + 1]) for d in docs]), device)


def _put(x: torch.Tensor, rows: Rows, value: torch.Tensor) -> None:
    if rows is None:
        x.copy_(value)
    elif isinstance(rows, slice):
        x[rows] = value
    else:
        x.index_copy_(0, rows, value)


BACKENDS = {
    "math": lambda dense_min: MathBackend(),
    "cpu_flash": lambda dense_min: DocumentRouter(CpuFlashDense(), CpuFlashBackend(), dense_min),
    "flash": lambda dense_min: FlashVarlenBackend(),
    "cudnn": lambda dense_min: DocumentRouter(CudnnDense(), FlashVarlenBackend(), dense_min),
}


def select_backend(name: str, device: torch.device | str,
                   dense_min: int = HardwareProfile.dense_min_tokens) -> AttentionBackend:
    """The named backend, checked to run on `device` (`parallel.choices.fastest_backend` names the
    one `auto` stands for); `dense_min` is the hardware profile's routing threshold (cuDNN, CPU flash)."""
    device = torch.device(device)
    if name not in BACKENDS:
        raise ValueError(f"attention backend '{name}' is not available here (have: {', '.join(BACKENDS)})")
    if name in CUDA_BACKENDS and device.type != "cuda":
        raise ValueError(f"attention backend '{name}' needs a CUDA device")
    return BACKENDS[name](dense_min)
