"""Runs a training job on Ray: an embedded local cluster by default, or an existing one.

The job is resolved once here (`trainer.job.resolve`) for the device its workers run on — this
machine's for an embedded cluster (before Ray starts), a probe of a remote cluster's GPUs once
connected — and every worker receives that resolved job. The driver holds the run folder's lease
(`launch.run_lock`) for the whole run, checks that the checkpoint folder takes writes, starts the
worker group and waits. A worker whose process dies, or whose collective times out, makes it
restart the whole group up to `cluster.max_failures` times (the trainer resumes from the newest
complete checkpoint); an error in the user's input stops the run at once. Either way the user
gets one line: which rank, what happened, how to resume — a traceback goes to the run folder.
Ctrl-C stops every worker before the driver exits.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Any

from launch.errors import WorkerDied, WorkerError
from trainer.checkpoint import CheckpointError, complete_checkpoints, probe_writable
from trainer.config import ConfigError, JobConfig
from trainer.job import Job, Target, check_dataset, check_pretrained, check_resume, resolve

if TYPE_CHECKING:
    from launch.reaper import Watcher
    from launch.worker_group import WorkerFailure


def _quiet_ray_env() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def _target(cfg: JobConfig, gpus: int, probe) -> Target:
    """The workers' device: GPUs when there are enough for every worker (`cluster.device: auto`)."""
    device, workers = cfg.cluster.device, cfg.cluster.workers
    if device == "cpu":
        return Target("cpu")
    if gpus >= workers:
        return probe()
    if device == "cuda":
        where = "the Ray cluster" if cfg.cluster.address else "this machine"
        raise ConfigError(f"cluster.device=cuda needs {workers} GPUs; {where} has {gpus}")
    return Target("cpu")


def local_target(cfg: JobConfig) -> Target:
    """What the workers of an embedded cluster on this machine run on."""
    if cfg.cluster.device == "cpu":
        return Target("cpu")
    import torch

    return _target(cfg, torch.cuda.device_count() if torch.cuda.is_available() else 0, Target.this_process)


def cluster_target(cfg: JobConfig) -> Target:
    """What the workers of the connected Ray cluster run on: one GPU of it, asked by a small task."""
    import ray

    probe = ray.remote(num_gpus=1)(_device_here)
    return _target(cfg, int(ray.cluster_resources().get("GPU", 0)), lambda: ray.get(probe.remote()))


def _device_here() -> Target:
    return Target.this_process()


def preflight(cfg: JobConfig) -> Job | None:
    """Every check that can run before Ray starts: the dataset, the checkpoint folder, whether the
    run's checkpoints fit this config, and for an embedded cluster the whole resolved job (a
    remote cluster's device is known only once connected)."""
    check_dataset(cfg)
    check_pretrained(cfg)
    job = None if cfg.cluster.address else resolve(cfg, local_target(cfg))
    probe_writable(cfg.checkpoint_folder)  # (creates the folder: only for a job that can run)
    check_resume(cfg)
    return job


def connect(cfg: JobConfig) -> Watcher | None:
    """Connects to `cluster.address` or starts a private local cluster (never one already running
    on this machine), watched so that it ends with this driver; the watcher of a cluster this call
    started (None otherwise)."""
    import ray

    from launch.reaper import Watcher, cluster_processes

    _quiet_ray_env()
    if ray.is_initialized():
        return None
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, logging_level=logging.ERROR, log_to_driver=True)
        return None
    cpus = max(os.cpu_count() or 1, cfg.cluster.workers * cfg.cluster.cpus_per_worker)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=True, runtime_env={"env_vars": {"RAY_DEDUP_LOGS": "0"}})
    return Watcher(cluster_processes())


def run_job(cfg: JobConfig, job: Job | None = None) -> list[dict[str, Any]]:
    """Runs the job (resolved by `preflight`, or here once connected) to its end; every worker's
    summary. The caller holds the run folder's lease."""
    import ray

    from launch.worker_group import WorkerFailure, WorkerGroup

    watcher = connect(cfg)
    t0 = time.time()
    try:
        job = job or resolve(cfg, cluster_target(cfg))
        layout = job.layout
        block = layout.tp * layout.sp  # ranks that must share a node
        print(f"ray: {'local cluster' if watcher else cfg.cluster.address or 'connected'}, "
              f"{cfg.cluster.workers} workers on {'GPU' if job.target.device == 'cuda' else 'CPU'}"
              + (f", groups of {block} per node" if block > 1 else ""), flush=True)
        failures = 0
        while True:
            group = WorkerGroup(job, block)
            try:
                results = group.run()
                print(f"job finished in {time.time() - t0:.0f} s", flush=True)
                return results
            except WorkerFailure as failure:
                if failure.cause is not None and not retryable(failure.cause):
                    raise failure.cause from None  # the user's input: the same again would fail the same way
                failures += 1
                if failures > cfg.cluster.max_failures:
                    raise final_error(cfg, failure) from None
                what = "died" if failure.cause is None else f"failed ({type(failure.cause).__name__})"
                print(f"worker failure: rank {failure.rank} {what}; restarting from the newest checkpoint "
                      f"[{failures}/{cfg.cluster.max_failures}]", flush=True)
            finally:
                group.shutdown()
    finally:
        if watcher:
            ray.shutdown()
            watcher.release()


def retryable(cause: BaseException) -> bool:
    """Whether a restart from the newest checkpoint may get past an error raised in a worker: not
    for mistakes in the input, which would fail the same way again."""
    from parallel.planner.adaptive import SequenceTooLong
    from trainer.dataset import DatasetError
    from trainer.engine import NonFiniteError

    return not isinstance(cause, (ConfigError, DatasetError, CheckpointError, NonFiniteError, SequenceTooLong))


def final_error(cfg: JobConfig, failure: WorkerFailure) -> Exception:
    """One line for a failure with no restarts left: the rank, what happened, how to go on."""
    done = complete_checkpoints(cfg.checkpoint_folder)
    resume = (f"running the same command again resumes from step {done[-1][0]}" if done
              else "no checkpoint was written yet: running the same command again starts over")
    if failure.cause is None:
        return WorkerDied(f"rank {failure.rank} died (its process ended without finishing its step); {resume}, "
                          f"and cluster.max_failures > 0 restarts automatically")
    log = cfg.run_path / f"error-rank{failure.rank}.log"
    log.write_text(re.sub(r"\x1b\[[0-9;]*m", "", failure.detail))
    message = str(failure.cause).splitlines()[0] if str(failure.cause) else ""
    return WorkerError(f"rank {failure.rank} failed: {type(failure.cause).__name__}: {message} "
                       f"(traceback: {log}); {resume}")
