"""AdamW with decoupled weight decay (none on norms), its moments on the GPU or in host memory
(`trainer.host_adamw`), and a linear-warmup + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.config import OptimConfig
from trainer.host_adamw import HostAdamW


def build_optimizer(model: nn.Module, cfg: OptimConfig, offload: bool = False,
                    local_ranks: int = 1) -> torch.optim.AdamW:
    """AdamW over the model's parameters; with `offload`, its moments in host memory shared by
    `local_ranks` ranks of one host."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in model.parameters())  # one kernel for the whole update on GPUs
    settings = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)
    if offload:
        return HostAdamW(groups, local_ranks=local_ranks, **settings)
    return torch.optim.AdamW(groups, **settings)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then cosine to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio))


class Schedules:
    """The LR schedules of the optimizers of a model's parts (pipeline stages), stepped together."""

    def __init__(self, schedulers: list[torch.optim.lr_scheduler.LRScheduler]):
        self.schedulers = schedulers

    def step(self) -> None:
        for s in self.schedulers:
            s.step()

    def last_lr(self) -> float:
        return self.schedulers[0].get_last_lr()[0]

    def state_dict(self) -> dict:
        return self.schedulers[0].state_dict()

    def load_state_dict(self, state: dict) -> None:
        for s in self.schedulers:
            s.load_state_dict(state)
