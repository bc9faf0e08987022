"""The training loop every worker runs, with torch.distributed already initialised.

A `Trainer` composes the parts of a resolved job (`trainer.job`): the mesh, the model made
parallel (`trainer.parallelize`), an engine that owns the update (`trainer.engine`), the step's
work on this rank (`trainer.work` or `trainer.adaptive_work`), a runner for its micro-batches
(`trainer.runner`), the loader, checkpoints and metrics. One step:

1. the loader hands over this rank's micro-batches (read ahead by a thread);
2. the work producer shards them for sequence parallelism and counts the step's labels;
3. the runner runs forward and backward with the loss scaled by dp × sp / that count;
4. the engine clips; one all-reduce collects the step's figures (the step's one host
   synchronisation); a step whose loss or gradient norm is not finite is skipped or stops the
   run (`train.nonfinite`), any other updates the weights;
5. every `checkpoint.every` steps, and at the end, a checkpoint — never of non-finite weights.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from parallel.attention import select_backend, warm_up
from parallel.mesh import ParallelDims
from parallel.planner.shape import recomputed_block_ids
from parallel.process_group import collective_guard
from trainer.adaptive_work import AdaptiveWork
from trainer.checkpoint import Checkpointer
from trainer.config import dump_config
from trainer.dataset import TokenDataset
from trainer.engine import DeepSpeedEngine, Engine, FSDPEngine, NonFiniteError
from trainer.hf import load_pretrained
from trainer.job import Job, check_resumable
from trainer.ledger import Ledger
from trainer.loader import StepLoader
from trainer.metrics import MetricsWriter, log0, peak_memory_gb, plot_loss
from trainer.model import Transformer, num_params
from trainer.activation_offload import InputOffload
from trainer.parallelize import parallelize, split_model, stage_ids
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
        self.backend = select_backend(job.attention_backend, self.device, job.hardware.dense_min_tokens)
        self.stages, self.parts = self.build_model()
        self.warm_up_attention()
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
                                         cfg.checkpoint.async_save, cfg.checkpoint.damaged)

    def build_model(self) -> tuple[list[int], list[Transformer]]:
        """The pipeline stages this rank runs and their model parts, made parallel."""
        cfg, dims = self.cfg, self.dims
        torch.manual_seed(cfg.train.seed)  # the whole model is initialised alike on every rank, then split
        with torch.device(self.device):  # built where it runs: no whole fp32 copy in host memory first
            model = Transformer(cfg.model)
        self.params = num_params(model)
        stages = stage_ids(dims.pp_rank, dims.layout.pp, dims.layout.pp_virtual)
        parts = [split_model(model, s, dims.layout.stages) for s in stages] if dims.layout.pp > 1 else [model]
        recomputed = recomputed_block_ids(self.job.recomputed_blocks, cfg.model.n_layers)
        saving = self.job.memory_saving
        self.input_offload = offload = None
        if saving.offload_inputs and recomputed:
            self.input_offload = offload = InputOffload(self.device)
        for part in parts:
            parallelize(part, dims, recomputed, self.job.compile, fsdp=cfg.parallel.dp_engine == "fsdp2",
                        param_dtype=self.dtype, keep_attention=saving.keep_attention, mlp_tile=saving.mlp_tile,
                        offload=offload)
        if cfg.model.init_from:  # each rank reads the slices it holds; a run's own checkpoint, if any, follows
            load_pretrained(parts, cfg.model.init_from, cfg.model.tie_embeddings)
        return stages, parts

    def warm_up_attention(self) -> None:
        """Builds the attention kernel's plans for every document length a micro-batch can hold, before
        the first step, where one rank holds whole documents with all its heads' share (sp = 1)."""
        layout, model = self.dims.layout, self.cfg.model
        if layout.sp == 1 and not layout.adaptive and model.softmax_layers and not model.window:
            warm_up(self.backend, min(self.cfg.data.context_len, self.cfg.data.tokens_per_microbatch),
                    model.n_heads // layout.tp, model.n_kv_heads // layout.tp, model.head_dim, self.dtype,
                    self.device)

    def build_engine(self) -> Engine:
        cfg = self.cfg
        if cfg.parallel.dp_engine == "deepspeed":
            return DeepSpeedEngine(cfg, self.parts[0], cfg.train.global_microbatches // self.dims.layout.dp,
                                   bf16=self.dtype == torch.bfloat16)
        return FSDPEngine(cfg, self.parts, self.dims, offload=self.job.memory_saving.offload_moments)

    # ------------------------------------------------------------------ checkpoints

    def app_state(self) -> dict[str, Any]:
        return {"loader": self.loader, "progress": self.progress, **self.engine.checkpoint_state()}

    def resume(self) -> int:
        latest = self.checkpointer.latest()
        if latest is None:
            return 0
        step, path, marker = latest
        check_resumable(self.cfg, self.loader.sampler.fingerprint, path, marker)
        self.checkpointer.load(path, self.app_state())
        self.engine.load_files(Path(path))
        self.ledger = Ledger.load(path)
        log0(f"resumed from {path} (step {self.progress.step}/{self.cfg.train.max_steps})")
        return step

    def save(self) -> None:
        """A checkpoint of this step — refused, keeping the older ones, if any weight is not finite."""
        checks = [torch.isfinite(local(p)).all() for part in self.parts for p in part.parameters()]
        finite = torch.stack(checks).all().float().cpu().reshape(1)  # (one device sync; the group is gloo)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN, group=self.dims.checkpoint_group)
        if not finite.item():
            raise NonFiniteError(f"the weights are not finite after step {self.progress.step}: no checkpoint "
                                 f"was written and the older ones are kept")
        meta = {"config": self.cfg.to_dict(), "data": self.loader.sampler.fingerprint}
        self.checkpointer.save(self.progress.step, self.app_state(), meta, self.ledger.save,
                               every_rank_files=self.engine.save_files)

    # ------------------------------------------------------------------ one step

    def train_step(self, batches) -> dict[str, Any]:
        """One optimizer step over this rank's micro-batches; returns the global figures."""
        dims = self.dims
        work = self.work(batches)
        lr = self.engine.lr()  # the rate of this step (engines step their schedules at its end)
        loss_sum = self.runner(work.items, loss_scale=dims.layout.dp * dims.layout.sp / work.labels)
        norm = self.engine.clip()
        first = dims.tp_rank == 0 and dims.pp_rank == 0
        last = dims.tp_rank == 0 and (dims.layout.pp == 1 or self.runner.last)
        # the step's one host synchronisation: its figures, summed over ranks, for the log
        real_tokens = float(sum(b.num_real for b, _ in work.items) * first)
        figures = torch.tensor([0.0, real_tokens, work.flops, 0.0], dtype=torch.float64, device=self.device)
        figures[0] = loss_sum.to(self.device, torch.float64) * last
        figures[3] = torch.as_tensor(norm, dtype=torch.float64).to(self.device) * (self.rank == 0)
        dist.all_reduce(figures)  # (the norm is global already: rank 0's copy is kept)
        loss, tokens, flops, grad_norm = figures.tolist()
        finite = math.isfinite(loss) and math.isfinite(grad_norm)  # every rank sees the same figures
        if finite:
            self.engine.update()
        else:
            self.engine.discard()
        return {"loss": loss / work.labels, "tokens": int(tokens), "flops": flops, "grad_norm": grad_norm,
                "lr": lr, "skipped": not finite, **work.info}

    def nonfinite(self, result: dict[str, Any], in_a_row: int) -> None:
        """A step whose loss or gradient norm is not finite: its update was skipped; stop if told to."""
        t = self.cfg.train
        what = f"step {self.progress.step}: the loss is {result['loss']} and the gradient norm {result['grad_norm']}"
        if t.nonfinite == "stop" or in_a_row > t.max_consecutive_skips:
            why = "train.nonfinite=stop" if t.nonfinite == "stop" else f"{in_a_row} such steps in a row"
            raise NonFiniteError(f"{what}; stopped ({why}) without applying it, the newest checkpoint kept; "
                                 f"lower optim.lr or look at the data, then run again")
        log0(f"warning: {what}; its update is skipped ({in_a_row} in a row; at most {t.max_consecutive_skips})")

    # ------------------------------------------------------------------ the run

    def fit(self, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Trains to max_steps (or run_steps more); `on_step(step)` runs after each step."""
        cfg, job = self.cfg, self.job
        log0(f"model: {self.params / 1e6:.2f}M parameters, {job.precision} compute, attention backend "
             f"'{self.backend.name}', layout {job.layout.describe()}, device {self.device.type}, "
             f"{job.memory_saving.describe(cfg.model.n_layers)}, {'compiled' if job.compile else 'eager'} element-wise ops")
        start = self.resume()
        if cfg.model.init_from and start == 0:
            scaling = cfg.model.rope_scaling
            log0(f"weights: {cfg.model.init_from} ({cfg.model.family}; RoPE θ={cfg.model.rope_theta:g}"
                 + (f", {scaling.get('rope_type') or scaling.get('type')} ×{scaling['factor']:g}" if scaling else "") + ")")
        if self.rank == 0:
            cfg.run_path.mkdir(parents=True, exist_ok=True)
            (cfg.run_path / "config.yaml").write_text(dump_config(cfg))
        writer = MetricsWriter(cfg.run_path, start, cfg.train.max_steps, cfg.train.log_every) if self.rank == 0 else None
        stop_at = cfg.train.max_steps if not cfg.train.run_steps else min(cfg.train.max_steps, start + cfg.train.run_steps)
        peak = job.peak_tflops
        losses, skipped = [], 0
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
                skipped = skipped + 1 if result["skipped"] else 0
                if skipped:
                    self.nonfinite(result, skipped)
                losses.append(result["loss"])
                flops_per_device = result["flops"] / dist.get_world_size()
                record = {
                    "step": self.progress.step, "loss": result["loss"], "tokens": result["tokens"],
                    "tokens_per_s": result["tokens"] / elapsed,
                    "fill": result["tokens"] / (cfg.train.global_microbatches * cfg.data.tokens_per_microbatch),
                    "mfu": flops_per_device / elapsed / (peak * 1e12) if peak else None,
                    "peak_mem_gb": peak_memory_gb(self.device), "data_wait_frac": self.loader.wait_s / elapsed,
                    "lr": result["lr"], "grad_norm": result["grad_norm"], "step_time_s": elapsed,
                    "skipped": result["skipped"],
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


def local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (DTensor) parameter."""
    return p.to_local() if hasattr(p, "to_local") else p


def train(job: Job) -> dict[str, Any]:
    """Entry point of every worker."""
    return Trainer(job).fit()
