"""`loom submit | status | logs | stop`: jobs on an existing Ray cluster through the Ray Jobs API.

`submit` writes the resolved config (overrides applied, data and run paths made absolute: they
must be on storage every node sees) into the run folder as `submitted-<time>.yaml`, uploads the
working directory (the code), and starts `loom train` on that file as the job's entrypoint; the
job joins the cluster with `address=auto`, so its workers spread over the cluster's nodes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

from trainer.config import ConfigError, JobConfig, dump_config

EXCLUDES = ["data/", "runs/", ".whl/", "__pycache__/", "*.arrow", ".pytest_cache/"]  # .git, .venv: Ray's own


def client(address: str):
    from ray.job_submission import JobSubmissionClient

    if address.startswith("ray://"):
        raise ConfigError(f"--address {address}: give the cluster's dashboard address, e.g. http://HEAD:8265")
    return JobSubmissionClient(address)


def stage(cfg: JobConfig) -> Path:
    """The resolved config, in the run folder on shared storage, for the job to read."""
    data = dataclasses.replace(cfg.data, path=str(Path(cfg.data.path).resolve()))
    cluster = dataclasses.replace(cfg.cluster, address="auto")
    staged = dataclasses.replace(cfg, data=data, cluster=cluster, run_dir=str(Path(cfg.run_dir).resolve()))
    staged.run_path.mkdir(parents=True, exist_ok=True)
    path = staged.run_path / f"submitted-{int(time.time())}.yaml"
    path.write_text(dump_config(staged))
    return path


AGENT_WAIT_S = 60  # a cluster just started may take this long before its job agent takes jobs


def submit(cfg: JobConfig, address: str, wait: bool = True, python: str = "python") -> str:
    staged = stage(cfg)
    jobs, deadline = client(address), time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            job = jobs.submit_job(
                entrypoint=f"{python} -m launch.cli train {staged}",
                submission_id=f"loom-{cfg.name}-{int(time.time())}",
                runtime_env={"working_dir": str(Path.cwd()), "excludes": EXCLUDES,
                             "env_vars": {"RAY_USAGE_STATS_ENABLED": "0", **cfg.cluster.env}},
            )
            break
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(2)
    print(f"submitted {job} to {address}; run folder {Path(cfg.run_dir).resolve() / cfg.name}", flush=True)
    if wait:
        status = follow(job, address)
        if status != "SUCCEEDED":
            raise RuntimeError(f"job {job} ended {status}")
    return job


def follow(job: str, address: str) -> str:
    async def tail() -> None:
        async for lines in client(address).tail_job_logs(job):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    return str(client(address).get_job_status(job)).split(".")[-1]


def status(job: str, address: str) -> str:
    info = client(address).get_job_info(job)
    state = str(info.status).split(".")[-1]
    print(f"{job}: {state}" + (f" — {info.message}" if info.message else ""))
    return state


def logs(job: str, address: str, follow_logs: bool = False) -> None:
    if follow_logs:
        follow(job, address)
    else:
        print(client(address).get_job_logs(job), end="")


def stop(job: str, address: str) -> None:
    stopped = client(address).stop_job(job)
    print(f"{job}: {'stop requested' if stopped else 'not running'}")
