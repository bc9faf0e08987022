"""Pipeline parallelism with `torch.distributed.pipelining`: 1F1B and interleaved 1F1B.

The layers are cut into pp × v stages of equal layer counts (v = 1, or the virtual stages per
rank of interleaved 1F1B); rank r runs stages r, r + pp, … Each stage is its own pruned copy of
the model (the layers it runs, plus the embedding on the first and the norm and output on the
last), so parameter names stay those of the whole model and checkpoints reshard across layouts.

Packed micro-batches carry per-micro-batch attention (document boundaries, SP layouts): the
trainer hands each stage the list of them for the step, and the schedule passes every stage the
micro-batch's index as a tensor kwarg. Micro-batches are padded to one length, since stages fix
their shapes at the first micro-batch.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from trainer.model import Mixers, Transformer

SCHEDULES = ("1f1b", "interleaved_1f1b")


def stage_ids(rank: int, pp: int, virtual: int) -> list[int]:
    return [rank + pp * v for v in range(virtual)]


def split_model(model: Transformer, stage: int, stages: int) -> Transformer:
    """A copy of the model holding only what stage `stage` of `stages` runs."""
    n = len(model.layers)
    per = n // stages
    keep = {str(i) for i in range(stage * per, (stage + 1) * per)}
    part = copy.deepcopy(model)
    for name in list(part.layers.keys()):
        if name not in keep:
            del part.layers[name]
    if stage > 0:
        part.tok_embeddings = None
    if stage < stages - 1:
        part.norm = None
        part.output = None
    return part


class StageModule(nn.Module):
    """What a pipeline stage runs: its part of the model on micro-batch `mb` of the current step."""

    def __init__(self, part: Transformer):
        super().__init__()
        self.part = part
        self.microbatches: list[tuple[torch.Tensor, Mixers]] = []  # (positions, mixers), set every step

    def forward(self, x: torch.Tensor, mb: torch.Tensor) -> torch.Tensor:
        positions, mixers = self.microbatches[int(mb.reshape(-1)[0])]
        if self.part.tok_embeddings is not None:
            x = x.reshape(-1)  # tokens arrive as [1, T] chunks of the step's [n, T]
        return self.part(x, positions, mixers)


class Pipeline:
    def __init__(self, parts: list[Transformer], stages: list[int], n_stages: int, microbatches: int,
                 schedule: str, group: dist.ProcessGroup, device: torch.device, loss_fn):
        self.modules = [StageModule(p) for p in parts]
        self.stages = [PipelineStage(m, s, n_stages, device, group=group) for m, s in zip(self.modules, stages)]
        self.first = 0 in stages
        self.last = n_stages - 1 in stages
        # the loss is already normalised by the step's global token count: no scaling by micro-batches
        if schedule == "1f1b":
            self.schedule = Schedule1F1B(self.stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
        else:
            self.schedule = ScheduleInterleaved1F1B(self.stages, microbatches, loss_fn=loss_fn, scale_grads=False)

    def step(self, tokens: torch.Tensor, labels: torch.Tensor, contexts: list[tuple[torch.Tensor, Mixers]]) -> list:
        """Forward and backward of one step's micro-batches (tokens and labels [n, T]); the losses
        of the last stage's micro-batches (an empty list on other ranks)."""
        for module in self.modules:
            module.microbatches = contexts
        index = torch.arange(len(contexts), device=tokens.device)
        losses: list = []
        args = (tokens,) if self.first else ()
        extra = {"target": labels, "losses": losses} if self.last else {}
        self.schedule.step(*args, mb=index, **extra)
        return losses


def clip_grad_norm(params: list[nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None) -> torch.Tensor:
    """Global-norm clipping over every stage's parameters (squared norms summed over pp); max_norm 0:
    none. The norm stays on the device: no host synchronisation."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    if pp_group is not None:
        squared = norm.double() ** 2
        dist.all_reduce(squared, group=pp_group)
        norm = squared.sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm
