"""DeepSpeed ZeRO as the data-parallel engine (`parallel.dp_engine: deepspeed`), for layouts with
data parallelism only (tp = pp = sp = 1).

The user's ZeRO stage and any DeepSpeed settings (offload, bucket sizes …) come from the config;
Loom sets what must agree with its loop: one packed micro-batch per forward, `global_microbatches
/ dp` of them accumulated per step, clipping at `optim.grad_clip` (DeepSpeed clips at 1.0 unless
told 0), bf16 on GPU. Gradients are not divided again by the accumulation steps, since every
micro-batch's loss is already normalised by the step's global token count. DeepSpeed keeps the
optimizer and LR schedule, and saves them in its own format inside Loom's atomic checkpoint
folder; such a checkpoint resumes on the same number of workers.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch

from trainer.config import JobConfig

TAG = "deepspeed"


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


class DeepSpeedEngine:
    def __init__(self, cfg: JobConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, microbatches_per_rank: int, bf16: bool):
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=ds_config(cfg, microbatches_per_rank, bf16))

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        """After each micro-batch; DeepSpeed steps the optimizer and schedule at the step's last one."""
        self.engine.step()

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else 0.0

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=TAG)

    def load(self, folder: Path) -> None:
        self.engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
