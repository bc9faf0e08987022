"""Which kernel runs what: the backend a name selects, and how the cuDNN backend serves packed blocks.

cuDNN's fused kernel is the fastest on dense sequences; torch's flash varlen op takes any packing
but runs at about 60% of cuDNN's speed on an H200 on long documents (and as fast below 2K tokens,
where a batch of equal documents through cuDNN is no faster). `DocumentRouter` gets both. The
documents of a block long enough to matter (`dense_min` queries and keys, causal ones square) go
to the dense kernel, those of one shape together as one batched call; the rest go together to one
varlen call. A group's rows are a slice when they lie next to each other (the sampler lists a
micro-batch's documents longest first, so they mostly do), gathered otherwise, and results are
written back into their rows: the result is exactly the per-document attention either kernel
alone computes. (Padding documents to a few lengths, so that cuDNN meets known shapes, was
measured slower in training on an H200: its gathers cost more than new shapes do.) Sequence lengths
come from the host (`BlockMask.q_lengths`, or a one-sequence block's `max_q`); a block's routing
is worked out once and kept with its mask, its indices copied to the device without waiting.
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
class DenseGroup:
    """Documents run by one dense call: `batch` of them, each of `lq` queries and `lk` keys."""

    batch: int
    lq: int
    lk: int
    causal: bool
    q_rows: Rows  # the block's query rows of these documents, in order
    k_rows: Rows


@dataclass
class Route:
    groups: list[DenseGroup]
    rest: BlockMask | None  # what the packed kernel takes, and its rows
    q_rows: Rows = None
    k_rows: Rows = None


class DocumentRouter(AttentionBackend):
    """Documents of a block of `dense_min` tokens or more to `dense` in batched calls, the rest to
    `packed` in one call."""

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
        docs = np.nonzero(long)[0]
        shapes = nq[docs] * (int(nk.max()) + 1) + nk[docs]  # documents of one (queries, keys) shape batch together
        groups = [DenseGroup(int(members.size), int(nq[members[0]]), int(nk[members[0]]), mask.causal,
                             _rows(oq, members, device), _rows(ok, members, device))
                  for members in (docs[shapes == s] for s in np.unique(shapes))]
        rest = np.nonzero(~long)[0]
        if not rest.size:
            return Route(groups, None)
        sub = BlockMask(_cu(nq[rest], device), _cu(nk[rest], device), int(nq[rest].max()), int(nk[rest].max()),
                        mask.causal, q_lengths=tuple(nq[rest].tolist()), k_lengths=tuple(nk[rest].tolist()))
        return Route(groups, sub, _rows(oq, rest, device), _rows(ok, rest, device))

    def forward(self, q, k, v, mask, scale):
        route = self.route(mask)
        if route is None:
            return self.packed.forward(q, k, v, mask, scale)
        out = torch.empty_like(q)
        lse = torch.empty((q.shape[1], q.shape[0]), dtype=lse_dtype(q.dtype), device=q.device)
        for g in route.groups:
            o, l = self.dense.forward_batched(_batch(q, g.q_rows, g.batch), _batch(k, g.k_rows, g.batch),
                                              _batch(v, g.k_rows, g.batch), g.causal, scale)
            _put(out, g.q_rows, o.flatten(0, 1))
            _put(lse.transpose(0, 1), g.q_rows, l.transpose(1, 2).flatten(0, 1).to(lse.dtype))
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
        for g in route.groups:
            qs = [_batch(x, g.q_rows, g.batch) for x in (dout, q, out, rows_lse)]
            gq, gk, gv = self.dense.backward_batched(qs[0], qs[1], _batch(k, g.k_rows, g.batch),
                                                     _batch(v, g.k_rows, g.batch), qs[2],
                                                     qs[3].transpose(1, 2).contiguous(), g.causal, scale)
            for full, rows, grad in ((dq, g.q_rows, gq), (dk, g.k_rows, gk), (dv, g.k_rows, gv)):
                _put(full, rows, grad.flatten(0, 1))
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


def _batch(x: torch.Tensor, rows: Rows, batch: int) -> torch.Tensor:
    """The rows of a group's documents as [batch, length, …]."""
    taken = select_rows(x, rows)
    return taken.reshape(batch, taken.shape[0] // batch, *x.shape[1:])


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
