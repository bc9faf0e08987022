"""The data-parallel engine: who owns the optimizer, the backward pass and the update.

`FSDPEngine` (the default) holds one AdamW and LR schedule per model part (pipeline stages have
several; the moments in host memory with `optim.offload`), clips the global gradient norm and steps them; its state is saved through DCP, so its
checkpoints reshard to any layout. `DeepSpeedEngine` hands the model to DeepSpeed ZeRO 1–3 for
data-parallel-only layouts, with the user's stage and settings (offload …) merged over the ones
Loom's loop needs: one packed micro-batch per forward, `global_microbatches / dp` of them
accumulated per step, clipping at `optim.grad_clip` (DeepSpeed clips at 1.0 unless told), bf16 on
GPU; gradients are not divided again by the accumulation steps, since every micro-batch's loss is
already normalised by the step's global label count. DeepSpeed keeps optimizer and schedule and
saves them in its own format inside Loom's checkpoint folder (resumable on the same world size).
"""

from __future__ import annotations

import copy
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch
from torch import nn

from parallel.mesh import ParallelDims
from parallel.pipeline import clip_grad_norm
from trainer.checkpoint import ModelAndOptimizer
from trainer.config import JobConfig
from trainer.optim import Schedules, build_optimizer, build_scheduler


class NonFiniteError(RuntimeError):
    """A step whose loss or gradients are not finite, where training cannot go on; one line."""


class Engine(ABC):
    parts: list[nn.Module]

    @property
    def model(self) -> nn.Module:
        """What runs a micro-batch forward (the whole model; pipelines call their stages instead)."""
        return self.parts[0]

    def before_microbatch(self, last: bool) -> None:
        """Called before each micro-batch of a step; `last` for its last one."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def clip(self) -> torch.Tensor | float:
        """Clips the step's gradients; returns their global norm before clipping."""

    @abstractmethod
    def update(self) -> None:
        """Applies the step's gradients to the weights and advances the LR schedule."""

    @abstractmethod
    def discard(self) -> None:
        """Drops the step's gradients without touching the weights (a non-finite step)."""

    @abstractmethod
    def lr(self) -> float: ...

    def checkpoint_state(self) -> dict[str, Any]:
        """Stateful objects for DCP (model, optimizer, schedule) — none for an engine that saves its own."""
        return {}

    def save_files(self, folder: Path) -> None:
        """Writes the engine's own files into a checkpoint folder (every rank)."""

    def load_files(self, folder: Path) -> None:
        """Reads them back on resume."""


class FSDPEngine(Engine):
    def __init__(self, cfg: JobConfig, parts: list[nn.Module], dims: ParallelDims, offload: bool = False):
        self.parts, self.dims, self.grad_clip = parts, dims, cfg.optim.grad_clip
        local_ranks = cfg.cluster.workers // cfg.cluster.nodes
        self.optimizers = [build_optimizer(part, cfg.optim, offload, local_ranks) for part in parts]
        self.schedules = Schedules([build_scheduler(o, cfg.optim, cfg.train.max_steps) for o in self.optimizers])

    def before_microbatch(self, last: bool) -> None:
        for part in self.parts:  # gradients are reduced once per step, at its last micro-batch
            part.set_requires_gradient_sync(last)
            if self.dims.layout.adaptive:  # keep weights gathered until this rank's last backward
                part.set_reshard_after_backward(last)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip(self) -> torch.Tensor:
        params = [p for part in self.parts for p in part.parameters()]
        return clip_grad_norm(params, self.grad_clip, self.dims.group("pp") if self.dims.layout.pp > 1 else None)

    def update(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()
        self.discard()
        self.schedules.step()

    def discard(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return self.schedules.last_lr()

    def checkpoint_state(self) -> dict[str, Any]:
        return {"train": ModelAndOptimizer(self.parts, self.optimizers), "scheduler": self.schedules}


def merge(base: dict, user: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in user.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def ds_config(cfg: JobConfig, microbatches_per_rank: int, bf16: bool) -> dict[str, Any]:
    base = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": microbatches_per_rank,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
    }
    return merge(base, cfg.parallel.deepspeed)


class DeepSpeedEngine(Engine):
    TAG = "deepspeed"

    def __init__(self, cfg: JobConfig, model: nn.Module, microbatches_per_rank: int, bf16: bool):
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config(cfg, microbatches_per_rank, bf16))
        self.parts = [model]

    @property
    def model(self) -> nn.Module:
        return self.engine

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()  # DeepSpeed steps optimizer and schedule itself at the step's last micro-batch

    def clip(self) -> float:
        norm = self.engine.get_global_grad_norm()  # (DeepSpeed clipped and stepped at the last micro-batch)
        return float(norm) if norm is not None else 0.0

    def update(self) -> None:
        """DeepSpeed has applied the step already."""

    def discard(self) -> None:
        raise NonFiniteError("DeepSpeed applied a non-finite step to the weights before Loom could skip it; "
                             "resume from the newest checkpoint with a lower optim.lr")

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save_files(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=self.TAG)

    def load_files(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder), tag=self.TAG, load_optimizer_states=True,
                                    load_lr_scheduler_states=True)
