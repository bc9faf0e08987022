"""Runs a training job on Ray: an embedded local cluster by default, or an existing one.

The driver starts the worker group, waits, and on a worker failure restarts the whole group up
to `cluster.max_failures` times; the trainer resumes from the newest complete checkpoint.
Ctrl-C stops every worker before the driver exits.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from trainer.config import JobConfig

log = logging.getLogger(__name__)


def _quiet_ray_env() -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


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


def use_gpus(cfg: JobConfig) -> bool:
    import ray

    if cfg.cluster.device == "cpu":
        return False
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.cluster.device == "cuda" and gpus < cfg.cluster.workers:
        raise RuntimeError(f"cluster.device=cuda needs {cfg.cluster.workers} GPUs; the Ray cluster has {gpus:g}")
    return gpus >= cfg.cluster.workers


def run_job(cfg: JobConfig) -> list[dict[str, Any]]:
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from launch.worker_group import WorkerGroup
    from parallel.mesh import ParallelDims

    started = connect(cfg)
    t0 = time.time()
    try:
        gpu = use_gpus(cfg)
        dims = ParallelDims.from_config(cfg)
        block = dims.tp * dims.sp  # ranks that must share a node
        print(f"ray: {'local cluster' if started else cfg.cluster.address or 'connected'}, "
              f"{cfg.cluster.workers} workers on {'GPU' if gpu else 'CPU'}"
              + (f", groups of {block} per node" if block > 1 else ""), flush=True)
        failures = 0
        while True:
            group = WorkerGroup(cfg, gpu, block)
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
