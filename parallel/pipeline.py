"""Pipeline parallelism with `torch.distributed.pipelining`: 1F1B and interleaved 1F1B schedules.

A pipeline rank holds one module per stage it runs (`v` stages per rank for interleaved 1F1B).
Packed micro-batches carry per-micro-batch state (document boundaries, SP layouts) that tensors
cannot: the schedule passes every stage the micro-batch's index as a tensor kwarg, and the stage
modules look their state up by it. Micro-batches must share one length, since stages fix their
shapes at the first. Gradient clipping sums the squared norms of every stage over the pp group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from parallel.choices import PipelineSchedule


class Pipeline:
    def __init__(self, modules: list[nn.Module], stages: list[int], n_stages: int, microbatches: int,
                 schedule: PipelineSchedule, group: dist.ProcessGroup, device: torch.device,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.stages = [PipelineStage(m, s, n_stages, device, group=group) for m, s in zip(modules, stages)]
        self.first = 0 in stages
        self.last = n_stages - 1 in stages
        # the loss is already normalised by the step's global token count: no scaling by micro-batches
        if schedule == "1f1b":
            self.schedule = Schedule1F1B(self.stages[0], microbatches, loss_fn=loss_fn, scale_grads=False)
        else:
            self.schedule = ScheduleInterleaved1F1B(self.stages, microbatches, loss_fn=loss_fn, scale_grads=False)

    def step(self, tokens: torch.Tensor, labels: torch.Tensor, microbatches: int) -> list[torch.Tensor]:
        """Forward and backward of one step's micro-batches (tokens and labels [n, T]); the losses
        of the last stage's micro-batches (an empty list on other ranks)."""
        index = torch.arange(microbatches, device=tokens.device)
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
