"""A step's work on this rank: which tokens of which micro-batches it runs, with which token mixing.

`StaticWork` takes this rank's data-parallel share of the step and, with sequence parallelism,
its SP share of each micro-batch (`parallel.sequence_parallel`): per-document zigzag for softmax
models, contiguous slices where linear layers pass one state per rank or pipeline stages need a
bounded length. Token streams are padded to a multiple of tp (sequence-parallel activations) or,
with pp, to the pipeline's fixed length. `trainer.adaptive_work` is the adaptive-SP counterpart;
both hand the step to the runner as one `StepWork`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from parallel.allgather_attention import AllGatherAttention
from parallel.attention import AttentionBackend, LocalAttention
from parallel.lasp import LocalLinearAttention, SequenceParallelLinear
from parallel.mesh import ParallelDims
from parallel.sequence_parallel import SequenceParallelAttention, make_layout
from trainer.config import JobConfig
from trainer.loader import PackedBatch
from trainer.loss import IGNORE
from trainer.model import Mixers


@dataclass
class StepWork:
    """What this rank runs in one optimizer step."""

    items: list[tuple[PackedBatch, Mixers]]  # its micro-batches and their token mixing
    labels: float  # label tokens of the whole step, every rank's together (the loss's denominator)
    flops: float  # model FLOPs this rank's share represents
    info: dict[str, Any] = field(default_factory=dict)  # figures for the log (adaptive plans)


def local_mixers(cfg: JobConfig, backend: AttentionBackend, batch: PackedBatch) -> Mixers:
    """Token mixing of a micro-batch held whole on this rank."""
    m = cfg.model
    return Mixers(LocalAttention(backend, batch.cu_seqlens, batch.max_seqlen, window=m.window,
                                 lengths=batch.doc_lengths()),
                  LocalLinearAttention(batch.cu_seqlens, m.linear_chunk) if m.has_linear else None)


def pad_to(batch: PackedBatch, mixers: Mixers, length: int) -> tuple[PackedBatch, Mixers]:
    """Pads the token stream to `length` with label-less tokens; mixing sees the real rows only."""
    pad = length - batch.num_tokens
    if pad == 0:
        return batch, mixers
    n = batch.num_tokens
    extend = lambda t, value: torch.cat([t, t.new_full((pad,), value)])  # noqa: E731
    padded = PackedBatch(extend(batch.tokens, 0), extend(batch.labels, IGNORE), extend(batch.positions, 0),
                         batch.cu_seqlens, batch.max_seqlen, batch.pieces, real_tokens=n)

    def strip(fn):
        if fn is None:
            return None

        def mix(q, k, v, *rest):
            out = fn(q[:n], k[:n], v[:n], *rest)
            return torch.cat([out, out.new_zeros((pad, *out.shape[1:]))])
        return mix

    return padded, Mixers(strip(mixers.softmax), strip(mixers.linear))


class StaticWork:
    def __init__(self, cfg: JobConfig, dims: ParallelDims, backend: AttentionBackend, device: torch.device,
                 pipelined: bool):
        self.cfg, self.dims, self.backend, self.device, self.pipelined = cfg, dims, backend, device, pipelined
        self.sp_groups = dims.sp_groups() if dims.layout.sp > 1 else None
        # label counts and FLOPs are counted once per dp replica (its tp, pp and sp ranks share the data)
        self.counts = dims.tp_rank == 0 and dims.pp_rank == 0 and dims.sp_rank == 0

    def __call__(self, batches: list[PackedBatch]) -> StepWork:
        lengths = [n for b in batches for n in b.doc_lengths()]
        flops = self.cfg.model.shape.model_flops(lengths) / self.dims.layout.sp * self.counts
        return StepWork([self.shard(b.to(self.device)) for b in batches], self.count_labels(batches), flops)

    def count_labels(self, batches: list[PackedBatch]) -> float:
        """The step's label tokens over all dp replicas (counted on the host batches)."""
        labels = torch.tensor([float(sum(b.num_labels() for b in batches)) * self.counts], dtype=torch.float64)
        dist.all_reduce(labels)
        return labels.item()

    def shard(self, batch: PackedBatch) -> tuple[PackedBatch, Mixers]:
        """This rank's tokens of a micro-batch and the token mixing that sees the rest of it, padded
        to a multiple of tp or, with pp, to the pipeline's fixed length."""
        local, mixers = self.sp_shard(batch)
        tp, sp = self.dims.layout.tp, self.dims.layout.sp
        length = -(-self.cfg.data.tokens_per_microbatch // sp) if self.pipelined else local.num_tokens
        return pad_to(local, mixers, -(-length // tp) * tp)

    def sp_shard(self, batch: PackedBatch) -> tuple[PackedBatch, Mixers]:
        if self.sp_groups is None:
            return batch, local_mixers(self.cfg, self.backend, batch)
        m, sp = self.cfg.model, self.cfg.parallel.sp
        layout = make_layout(batch.doc_lengths(), self.sp_groups, window=m.window, device=self.device,
                             zigzag=not m.has_linear and not self.pipelined)
        idx = torch.from_numpy(layout.indices(self.sp_groups.rank)).to(self.device)
        local = PackedBatch(batch.tokens[idx], batch.labels[idx], batch.positions[idx], batch.cu_seqlens,
                            batch.max_seqlen, batch.pieces)
        softmax = (AllGatherAttention(layout, self.sp_groups, self.backend) if sp.method == "allgather"
                   else SequenceParallelAttention(layout, self.sp_groups, self.backend))
        linear = (SequenceParallelLinear(layout, self.sp_groups, sp.linear_method, m.linear_chunk)
                  if m.has_linear else None)
        return local, Mixers(softmax, linear)
