"""The training loop every worker runs, with torch.distributed already initialised.

Order of a step: fetch this rank's micro-batches; all-reduce the step's label count; forward
and backward each micro-batch with its summed loss scaled by dp / that global count (FSDP
averages over dp, so the update equals a single worker's on the same global batch); clip, step the
optimizer and the schedule; log; checkpoint every `checkpoint.every` steps and at the end.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from launch.distributed import collective_guard
from parallel.allgather_attention import AllGatherAttention
from parallel.attention import LocalAttention, select_backend
from parallel.lasp import LocalLinearAttention, SequenceParallelLinear
from parallel.data_parallel import apply_activation_checkpointing, apply_fsdp
from parallel.mesh import ParallelDims
from parallel.planner.cost_model import CostModel, hardware_profile
from parallel.sequence_parallel import SequenceParallelAttention, make_layout
from trainer.adaptive_step import AdaptiveStep
from trainer.checkpoint import Checkpointer, ModelAndOptimizer
from trainer.config import JobConfig, dump_config
from trainer.dataset import TokenDataset
from trainer.ledger import Ledger
from trainer.loader import IGNORE, PackedBatch, StepLoader
from trainer.metrics import MetricsWriter, log0, peak_memory_gb, peak_tflops, plot_loss, training_flops
from trainer.model import Mixers, Transformer, num_params
from trainer.optim import build_optimizer, build_scheduler
from trainer.sampler import PackedSampler


@dataclass
class Progress:
    """The step counter, as a checkpointable object."""

    step: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def worker_device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def compute_dtype(cfg: JobConfig, device: torch.device) -> torch.dtype:
    if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


class Trainer:
    def __init__(self, cfg: JobConfig, device: torch.device | None = None):
        self.cfg = cfg
        self.device = device or worker_device()
        self.rank = dist.get_rank()
        self.dims = ParallelDims.from_config(cfg, dist.get_world_size()).build(self.device)
        torch.manual_seed(cfg.train.seed)
        model = Transformer(cfg.model).to(self.device)
        if cfg.train.activation_checkpointing:
            apply_activation_checkpointing(model)
        self.dtype = compute_dtype(cfg, self.device)
        # adaptive groups run different numbers of micro-batches: gather once per step (see train_step)
        self.model = apply_fsdp(model, self.dims.fsdp_mesh, param_dtype=self.dtype,
                                reshard_after_forward=not self.dims.adaptive)
        self.sp_groups = self.dims.sp_groups() if self.dims.sp > 1 and not self.dims.adaptive else None
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.max_steps)
        self.backend = select_backend(cfg.model.attention_backend, self.device)
        dataset = TokenDataset(cfg.data.path)
        sampler = PackedSampler(dataset.lengths, cfg.data.context_len, cfg.data.tokens_per_microbatch,
                                cfg.train.global_microbatches, cfg.data.seed, cfg.data.bucket_edges,
                                dataset.fingerprint)
        if self.dims.adaptive:  # every rank reads the whole step; the plan decides who runs what
            self.loader = StepLoader(dataset, sampler, 0, 1, cfg.data.prefetch)
            self.adaptive = AdaptiveStep(self.dims, self.backend, self.device, *adaptive_budget(cfg, self.device),
                                         cfg.parallel.sp.solver_time_s, cfg.model.window)
        else:
            self.loader = StepLoader(dataset, sampler, self.dims.dp_rank, self.dims.dp, cfg.data.prefetch)
            self.adaptive = None
        self.progress = Progress()
        self.ledger = Ledger()
        self.checkpointer = Checkpointer(cfg.run_path / "checkpoints", cfg.checkpoint.keep_last,
                                         self.dims.checkpoint_group, cfg.checkpoint.async_save)
        self.peak = peak_tflops(self.device, cfg.cluster.peak_tflops)

    def app_state(self) -> dict[str, Any]:
        return {"train": ModelAndOptimizer(self.model, self.optimizer), "scheduler": self.scheduler,
                "loader": self.loader, "progress": self.progress}

    def resume(self) -> int:
        latest = self.checkpointer.latest()
        if latest is None:
            return 0
        step, path = latest
        self.checkpointer.load(path, self.app_state())
        self.ledger = Ledger.load(path)
        log0(f"resumed from {path} (step {self.progress.step}/{self.cfg.train.max_steps})")
        return step

    def save(self) -> None:
        self.checkpointer.save(self.progress.step, self.app_state(), self.cfg.to_dict(), self.ledger.save)

    def shard(self, batch: PackedBatch) -> tuple[PackedBatch, Mixers]:
        """This rank's tokens of a micro-batch and the token mixing that sees the rest of it."""
        m, sp = self.cfg.model, self.cfg.parallel.sp
        if self.sp_groups is None:
            return batch, Mixers(LocalAttention(self.backend, batch.cu_seqlens, batch.max_seqlen, window=m.window),
                                 LocalLinearAttention(batch.cu_seqlens, m.linear_chunk) if m.has_linear else None)
        # linear layers pass one state per rank over contiguous slices; softmax-only models balance by zigzag
        layout = make_layout(batch.doc_lengths(), self.sp_groups, window=m.window, device=self.device,
                             zigzag=not m.has_linear)
        idx = torch.from_numpy(layout.indices(self.sp_groups.rank)).to(self.device)
        local = PackedBatch(batch.tokens[idx], batch.labels[idx], batch.positions[idx], batch.cu_seqlens,
                            batch.max_seqlen, batch.pieces)
        softmax = (AllGatherAttention(layout, self.sp_groups, self.backend) if sp.method == "allgather"
                   else SequenceParallelAttention(layout, self.sp_groups, self.backend))
        linear = SequenceParallelLinear(layout, self.sp_groups, sp.linear_method, m.linear_chunk) if m.has_linear else None
        return local, Mixers(softmax, linear)

    def static_work(self, batches: list[PackedBatch]):
        """This rank's micro-batches (its SP share of its dp share), the step's label count, its FLOPs."""
        shards = [self.shard(b.to(self.device)) for b in batches]
        labels = torch.tensor([float(sum(b.num_labels() for b, _ in shards))], dtype=torch.float64)
        dist.all_reduce(labels)
        flops = training_flops(self.cfg.model, [n for b in batches for n in b.doc_lengths()]) / self.dims.sp
        return shards, labels.item(), flops, {}

    def adaptive_work(self, batches: list[PackedBatch]):
        plan = self.adaptive.plan(batches, self.loader.peek)
        step = [b.to(self.device) for b in batches]
        items, lengths = self.adaptive.work(plan, step)
        group = plan.group_of(self.adaptive.pool_rank)
        flops = training_flops(self.cfg.model, lengths) / group.size if group and lengths else 0.0
        info = {"sp_groups": plan.describe(), "predicted_s": plan.predicted_s, "solve_s": plan.solve_s,
                "plan_gap": plan.gap, "solver": plan.solver}
        return items, float(sum(b.num_labels() for b in batches)), flops, info

    def train_step(self, batches: list[PackedBatch]) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches; returns the global figures."""
        items, global_labels, flops, info = (self.adaptive_work if self.adaptive else self.static_work)(batches)
        # FSDP averages over its dp × sp ranks: see parallel/data_parallel.py
        loss_scale = self.dims.dp * self.dims.sp / global_labels
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32
                    else contextlib.nullcontext())
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, (batch, attend) in enumerate(items):
            last = i == len(items) - 1
            self.model.set_requires_gradient_sync(last)
            if self.adaptive:  # keep weights gathered until this rank's last backward
                self.model.set_reshard_after_backward(last)
            with autocast:
                logits = self.model(batch.tokens, batch.positions, attend)
            loss = F.cross_entropy(logits.float(), batch.labels, ignore_index=IGNORE, reduction="sum")
            (loss * loss_scale).backward()
            loss_sum += loss.detach().double()
        lr = self.scheduler.get_last_lr()[0]
        clip = self.cfg.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        figures = torch.tensor([loss_sum.item(), sum(b.num_tokens for b, _ in items if b.pieces), flops],
                               dtype=torch.float64)
        dist.all_reduce(figures)
        norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        return {"loss": figures[0].item() / global_labels, "tokens": int(figures[1].item()),
                "flops": figures[2].item(), "grad_norm": float(norm), "lr": lr, **info}

    def fit(self, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Trains to max_steps (or run_steps more); `on_step(step)` runs after each step."""
        cfg = self.cfg
        log0(f"model: {num_params(self.model) / 1e6:.2f}M parameters, {str(self.dtype).split('.')[-1]} compute, "
             f"attention backend '{self.backend.name}', layout {self.dims.describe()}, device {self.device.type}")
        start = self.resume()
        if self.rank == 0:
            cfg.run_path.mkdir(parents=True, exist_ok=True)
            (cfg.run_path / "config.yaml").write_text(dump_config(cfg))
        writer = MetricsWriter(cfg.run_path, start, cfg.train.max_steps, cfg.train.log_every) if self.rank == 0 else None
        stop_at = cfg.train.max_steps if not cfg.train.run_steps else min(cfg.train.max_steps, start + cfg.train.run_steps)
        losses = []
        try:
            while self.progress.step < stop_at:
                t0 = time.perf_counter()
                self.loader.wait_s = 0.0
                batches = self.loader.next_step()
                with collective_guard(self.rank, f"step {self.progress.step + 1}", cfg.cluster.timeout_s):
                    result = self.train_step(batches)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t0
                self.progress.step += 1
                self.ledger.record(self.progress.step, self.loader.step_pieces)
                losses.append(result["loss"])
                flops_per_device = result["flops"] / dist.get_world_size()
                record = {
                    "step": self.progress.step, "loss": result["loss"], "tokens": result["tokens"],
                    "tokens_per_s": result["tokens"] / elapsed,
                    "mfu": flops_per_device / elapsed / (self.peak * 1e12) if self.peak else None,
                    "peak_mem_gb": peak_memory_gb(self.device), "data_wait_frac": self.loader.wait_s / elapsed,
                    "lr": result["lr"], "grad_norm": result["grad_norm"], "step_time_s": elapsed,
                    **{k: result[k] for k in ("sp_groups", "predicted_s", "solve_s", "plan_gap") if k in result},
                }
                if writer:
                    writer.write(record)
                with collective_guard(self.rank, f"the checkpoint of step {self.progress.step}", cfg.cluster.timeout_s):
                    self.checkpointer.wait()  # an async save started last step is finalised here
                    if self.progress.step % cfg.checkpoint.every == 0 or self.progress.step == stop_at:
                        self.save()
                if on_step:
                    on_step(self.progress.step)
            self.checkpointer.wait()
        finally:
            self.loader.close()
            if self.adaptive:
                self.adaptive.close()
            if writer:
                writer.close()
        plot = plot_loss(cfg.run_path) if self.rank == 0 and losses else None
        return {"start_step": start, "step": self.progress.step, "max_steps": cfg.train.max_steps,
                "losses": losses, "loss_plot": str(plot) if plot else None}


def adaptive_budget(cfg: JobConfig, device: torch.device) -> tuple[CostModel, int]:
    """The cost model of adaptive SP and each rank's activation budget in tokens."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    cost = CostModel(cfg.model, hardware_profile(cfg.cluster.profile, name), method=cfg.parallel.sp.method)
    budget = cfg.parallel.sp.tokens_per_gpu or cost.tokens_per_gpu(cfg.cluster.workers, unsharded_copy=True)
    return cost, budget


def train(cfg: JobConfig) -> dict[str, Any]:
    """Entry point of every worker."""
    return Trainer(cfg).fit()
