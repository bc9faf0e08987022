"""Runs a training job on Ray: an embedded local cluster by default, or an existing one.

The job is resolved once here (`trainer.job.resolve`) for the device its workers run on — this
machine's for an embedded cluster (before Ray starts), a probe of a remote cluster's GPUs once
connected — and every worker receives that resolved job. The driver starts the worker group,
waits, and on a worker failure restarts the whole group up to `cluster.max_failures` times; the
trainer resumes from the newest complete checkpoint. Ctrl-C stops every worker before the
driver exits.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from trainer.config import ConfigError, JobConfig
from trainer.job import Job, Target, check_dataset, resolve

log = logging.getLogger(__name__)


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
    """Every check that can run before Ray starts: the dataset, and for an embedded cluster the
    whole resolved job (a remote cluster's device is known only once connected)."""
    check_dataset(cfg)
    return None if cfg.cluster.address else resolve(cfg, local_target(cfg))


def connect(cfg: JobConfig) -> bool:
    """Connects to `cluster.address` or starts a local cluster; True if this call started one."""
    import ray

    _quiet_ray_env()
    if ray.is_initialized():
        return False
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, logging_level=logging.ERROR, log_to_driver=True)
        return False
    cpus = max(os.cpu_count() or 1, cfg.cluster.workers * cfg.cluster.cpus_per_worker)
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=True,
             runtime_env={"env_vars": {"RAY_DEDUP_LOGS": "0"}})
    return True


def run_job(cfg: JobConfig, job: Job | None = None) -> list[dict[str, Any]]:
    """Runs the job (resolved by `preflight`, or here once connected) to its end; every worker's summary."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from launch.worker_group import WorkerGroup

    started = connect(cfg)
    t0 = time.time()
    try:
        job = job or resolve(cfg, cluster_target(cfg))
        layout = job.layout
        block = layout.tp * layout.sp  # ranks that must share a node
        print(f"ray: {'local cluster' if started else cfg.cluster.address or 'connected'}, "
              f"{cfg.cluster.workers} workers on {'GPU' if job.target.device == 'cuda' else 'CPU'}"
              + (f", groups of {block} per node" if block > 1 else ""), flush=True)
        failures = 0
        while True:
            group = WorkerGroup(job, block)
            try:
                results = group.run()
                print(f"job finished in {time.time() - t0:.0f} s", flush=True)
                return results
            except (RayActorError, RayTaskError) as err:
                failures += 1
                if failures > cfg.cluster.max_failures:
                    raise
                print(f"worker failure ({type(err).__name__}); restarting from the newest checkpoint "
                      f"[{failures}/{cfg.cluster.max_failures}]", flush=True)
            finally:
                group.shutdown()
    finally:
        if started:
            ray.shutdown()
