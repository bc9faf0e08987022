"""The training loop every worker runs, with torch.distributed already initialised.

A `Trainer` composes the parts of a resolved job (`trainer.job`): the mesh, the model made
parallel (`trainer.parallelize`), an engine that owns the update (`trainer.engine`), the step's
work on this rank (`trainer.work` or `trainer.adaptive_work`), a runner for its micro-batches
(`trainer.runner`), the loader, checkpoints and metrics. One step:

1. the loader hands over this rank's micro-batches (read ahead by a thread);
2. the work producer shards them for sequence parallelism and counts the step's labels;
3. the runner runs forward and backward with the loss scaled by dp × sp / that count;
4. the engine clips and updates; one all-reduce collects the step's figures for the log;
5. every `checkpoint.every` steps, and at the end, a checkpoint.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from parallel.attention import select_backend
from parallel.mesh import ParallelDims
from parallel.process_group import collective_guard
from trainer.adaptive_work import AdaptiveWork
from trainer.checkpoint import Checkpointer
from trainer.config import dump_config
from trainer.dataset import TokenDataset
from trainer.engine import DeepSpeedEngine, Engine, FSDPEngine
from trainer.job import Job
from trainer.ledger import Ledger
from trainer.loader import StepLoader
from trainer.metrics import MetricsWriter, log0, peak_memory_gb, plot_loss
from trainer.model import Transformer, num_params
from trainer.parallelize import parallelize, recomputed_block_ids, split_model, stage_ids
from trainer.runner import MicrobatchRunner, PipelineRunner, Precision
from trainer.sampler import PackedSampler
from trainer.work import StaticWork

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


class Trainer:
    def __init__(self, job: Job, device: torch.device | None = None):
        cfg = self.cfg = job.cfg
        self.job = job
        self.device = device or worker_device()
        self.rank = dist.get_rank()
        self.dims = dims = ParallelDims(job.layout, self.device)
        self.dtype = DTYPES[job.precision]
        self.backend = select_backend(job.attention_backend, self.device)
        self.stages, self.parts = self.build_model()
        self.engine = self.build_engine()
        precision = Precision(self.dtype, self.device, tensor_parallel=dims.layout.tp > 1)
        if dims.layout.pp > 1:
            self.runner = PipelineRunner(self.parts, self.stages, dims, cfg.train.global_microbatches // dims.layout.dp,
                                         cfg.parallel.pp_schedule, precision, self.device)
        else:
            self.runner = MicrobatchRunner(self.engine, precision, cfg.train.loss_chunk, self.device)
        dataset = TokenDataset(cfg.data.path)
        sampler = PackedSampler(dataset.lengths, cfg.data.context_len, cfg.data.tokens_per_microbatch,
                                cfg.train.global_microbatches, cfg.data.seed, cfg.data.bucket_edges,
                                dataset.fingerprint)
        if dims.layout.adaptive:  # every rank reads the whole step; the plan decides who runs what
            self.loader = StepLoader(dataset, sampler, 0, 1, cfg.data.prefetch)
            self.work = AdaptiveWork(cfg, dims, self.backend, self.device, job.cost_model(), job.tokens_per_gpu,
                                     self.loader.peek)
        else:
            self.loader = StepLoader(dataset, sampler, dims.dp_rank, dims.layout.dp, cfg.data.prefetch)
            self.work = StaticWork(cfg, dims, self.backend, self.device, pipelined=dims.layout.pp > 1)
        self.progress = Progress()
        self.ledger = Ledger()
        self.checkpointer = Checkpointer(cfg.checkpoint_folder, cfg.checkpoint.keep_last, dims.checkpoint_group,
                                         cfg.checkpoint.async_save)

    def build_model(self) -> tuple[list[int], list[Transformer]]:
        """The pipeline stages this rank runs and their model parts, made parallel."""
        cfg, dims = self.cfg, self.dims
        torch.manual_seed(cfg.train.seed)  # the whole model is initialised alike on every rank, then split
        model = Transformer(cfg.model).to(self.device)
        self.params = num_params(model)
        stages = stage_ids(dims.pp_rank, dims.layout.pp, dims.layout.pp_virtual)
        parts = [split_model(model, s, dims.layout.stages) for s in stages] if dims.layout.pp > 1 else [model]
        recomputed = recomputed_block_ids(self.job.recomputed_blocks, cfg.model.n_layers)
        for part in parts:
            parallelize(part, dims, recomputed, self.job.compile, fsdp=cfg.parallel.dp_engine == "fsdp2",
                        param_dtype=self.dtype)
        return stages, parts

    def build_engine(self) -> Engine:
        cfg = self.cfg
        if cfg.parallel.dp_engine == "deepspeed":
            return DeepSpeedEngine(cfg, self.parts[0], cfg.train.global_microbatches // self.dims.layout.dp,
                                   bf16=self.dtype == torch.bfloat16)
        return FSDPEngine(cfg, self.parts, self.dims)

    # ------------------------------------------------------------------ checkpoints

    def app_state(self) -> dict[str, Any]:
        return {"loader": self.loader, "progress": self.progress, **self.engine.checkpoint_state()}

    def resume(self) -> int:
        latest = self.checkpointer.latest()
        if latest is None:
            return 0
        step, path = latest
        self.checkpointer.load(path, self.app_state())
        self.engine.load_files(Path(path))
        self.ledger = Ledger.load(path)
        log0(f"resumed from {path} (step {self.progress.step}/{self.cfg.train.max_steps})")
        return step

    def save(self) -> None:
        self.checkpointer.save(self.progress.step, self.app_state(), self.cfg.to_dict(), self.ledger.save,
                               every_rank_files=self.engine.save_files)

    # ------------------------------------------------------------------ one step

    def train_step(self, batches) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches; returns the global figures."""
        dims = self.dims
        work = self.work(batches)
        lr = self.engine.lr()  # the rate of this step (engines step their schedules at its end)
        loss_sum = self.runner(work.items, loss_scale=dims.layout.dp * dims.layout.sp / work.labels)
        norm = self.engine.step()
        first = dims.tp_rank == 0 and dims.pp_rank == 0
        last = dims.tp_rank == 0 and (dims.layout.pp == 1 or self.runner.last)
        # the step's one host synchronisation: its figures, summed over ranks, for the log
        real_tokens = float(sum(b.num_real for b, _ in work.items) * first)
        figures = torch.tensor([0.0, real_tokens, work.flops, 0.0], dtype=torch.float64, device=self.device)
        figures[0] = loss_sum.to(self.device, torch.float64) * last
        figures[3] = torch.as_tensor(norm, dtype=torch.float64).to(self.device) * (self.rank == 0)
        dist.all_reduce(figures)  # (the norm is global already: rank 0's copy is kept)
        loss, tokens, flops, grad_norm = figures.tolist()
        return {"loss": loss / work.labels, "tokens": int(tokens), "flops": flops, "grad_norm": grad_norm,
                "lr": lr, **work.info}

    # ------------------------------------------------------------------ the run

    def fit(self, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Trains to max_steps (or run_steps more); `on_step(step)` runs after each step."""
        cfg, job = self.cfg, self.job
        log0(f"model: {self.params / 1e6:.2f}M parameters, {job.precision} compute, attention backend "
             f"'{self.backend.name}', layout {job.layout.describe()}, device {self.device.type}, "
             f"{job.recomputed_blocks}/{cfg.model.n_layers} blocks recomputed, "
             f"{'compiled' if job.compile else 'eager'} element-wise ops")
        start = self.resume()
        if self.rank == 0:
            cfg.run_path.mkdir(parents=True, exist_ok=True)
            (cfg.run_path / "config.yaml").write_text(dump_config(cfg))
        writer = MetricsWriter(cfg.run_path, start, cfg.train.max_steps, cfg.train.log_every) if self.rank == 0 else None
        stop_at = cfg.train.max_steps if not cfg.train.run_steps else min(cfg.train.max_steps, start + cfg.train.run_steps)
        peak = job.peak_tflops
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
                    "mfu": flops_per_device / elapsed / (peak * 1e12) if peak else None,
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
            if isinstance(self.work, AdaptiveWork):
                self.work.close()
            if writer:
                writer.close()
        plot = plot_loss(cfg.run_path) if self.rank == 0 and losses else None
        return {"start_step": start, "step": self.progress.step, "max_steps": cfg.train.max_steps,
                "losses": losses, "loss_plot": str(plot) if plot else None}


def train(job: Job) -> dict[str, Any]:
    """Entry point of every worker."""
    return Trainer(job).fit()
