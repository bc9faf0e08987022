"""Running a step's micro-batches forward and backward: one after another, or through the pipeline.

Each micro-batch's loss is its summed token cross-entropy × `loss_scale` (dp × sp / the step's
global label count: FSDP averages over its dp × sp ranks, so the update is the gradient of the
global mean loss — see `parallel.data_parallel`). Both runners return the step's summed token
loss, unscaled, on the device (no host synchronisation inside a step).

`MicrobatchRunner` runs the model on each micro-batch and lets the engine take the backward.
`PipelineRunner` hands the step to `torch.distributed.pipelining`'s schedule: every stage module
reads the step's `StepContext` — each micro-batch's positions and token mixing, and the loss scale
the last stage's loss function applies — which the runner sets once per step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor.parallel import loss_parallel

from parallel.mesh import ParallelDims
from parallel.pipeline import Pipeline
from trainer.engine import Engine
from trainer.loader import PackedBatch
from trainer.loss import IGNORE
from trainer.model import Mixers, Transformer

Items = list[tuple[PackedBatch, Mixers]]


def full(x: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (the loss under tensor parallelism), a plain tensor as it is."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x


class Precision:
    """The step's autocast and, under tensor parallelism, the loss-parallel context."""

    def __init__(self, dtype: torch.dtype, device: torch.device, tensor_parallel: bool):
        self.dtype, self.device, self.tensor_parallel = dtype, device, tensor_parallel

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def vocab_parallel(self):
        return loss_parallel() if self.tensor_parallel else contextlib.nullcontext()


class MicrobatchRunner:
    def __init__(self, engine: Engine, precision: Precision, loss_chunk: int, device: torch.device):
        self.engine, self.precision, self.loss_chunk, self.device = engine, precision, loss_chunk, device

    def loss(self, batch: PackedBatch, mixers: Mixers) -> torch.Tensor:
        model = self.engine.model
        if self.precision.tensor_parallel:  # logits sharded over the vocabulary: a loss-parallel cross-entropy
            logits = model(batch.tokens, batch.positions, mixers)
            return F.cross_entropy(logits.float(), batch.labels, ignore_index=IGNORE, reduction="sum")
        # the loss inside the model, `train.loss_chunk` tokens at a time: never all logits at once
        return model(batch.tokens, batch.positions, mixers, batch.labels, self.loss_chunk)

    def __call__(self, items: Items, loss_scale: float) -> torch.Tensor:
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, (batch, mixers) in enumerate(items):
            self.engine.before_microbatch(last=i == len(items) - 1)
            with self.precision.vocab_parallel():
                with self.precision.autocast():
                    loss = self.loss(batch, mixers)
                self.engine.backward(loss * loss_scale)
            loss_sum += full(loss).detach().double()
        return loss_sum


@dataclass
class StepContext:
    """What every pipeline stage reads during one step."""

    microbatches: list[tuple[torch.Tensor, Mixers]] = field(default_factory=list)  # (positions, mixers)
    loss_scale: float = 1.0


class StageModule(nn.Module):
    """What a pipeline stage runs: its part of the model on micro-batch `mb` of the current step."""

    def __init__(self, part: Transformer, context: StepContext):
        super().__init__()
        self.part, self.context = part, context

    def forward(self, x: torch.Tensor, mb: torch.Tensor) -> torch.Tensor:
        positions, mixers = self.context.microbatches[int(mb.reshape(-1)[0])]
        if self.part.tok_embeddings is not None:
            x = x.reshape(-1)  # tokens arrive as [1, T] chunks of the step's [n, T]
        return self.part(x, positions, mixers)


class PipelineRunner:
    def __init__(self, parts: list[Transformer], stages: list[int], dims: ParallelDims, microbatches: int,
                 schedule: str, precision: Precision, device: torch.device):
        self.context = StepContext()
        self.precision, self.device = precision, device
        modules = [StageModule(part, self.context) for part in parts]
        self.pipeline = Pipeline(modules, stages, dims.layout.stages, microbatches, schedule, dims.group("pp"),
                                 device, self.stage_loss)

    @property
    def last(self) -> bool:
        return self.pipeline.last

    def stage_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits.float(), labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
        return loss * self.context.loss_scale

    def __call__(self, items: Items, loss_scale: float) -> torch.Tensor:
        self.context.microbatches = [(b.positions, mixers) for b, mixers in items]
        self.context.loss_scale = loss_scale
        tokens = torch.stack([b.tokens for b, _ in items])
        labels = torch.stack([b.labels for b, _ in items])
        with self.precision.autocast(), self.precision.vocab_parallel():
            losses = self.pipeline.step(tokens, labels, len(items))
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for loss in losses:  # (only the last stage has losses)
            total += full(loss).detach().double()
        return total / loss_scale
