"""A group of Ray actors, one per training process.

Consecutive ranks form blocks of tp × sp ranks (the innermost dims of `ParallelDims`, whose
groups exchange the most); each block is one STRICT_PACK placement group, so a tp or sp group
never spans two nodes. Rank 0's actor sits in block 0; its node address and a free port there
become MASTER_ADDR/PORT, and every actor joins the process group over TCP with the config's
environment (NCCL / gloo settings) and the GPUs of its node visible.
"""

from __future__ import annotations

import os
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from launch.errors import PlacementError
from trainer.job import Job


class WorkerFailure(Exception):
    """Rank `rank` of the group failed: its process died (`cause` None) or its code raised `cause`."""

    def __init__(self, rank: int, cause: BaseException | None, detail: str):
        super().__init__(f"rank {rank}: {detail}")
        self.rank, self.cause, self.detail = rank, cause, detail


@ray.remote
class TrainWorker:
    def __init__(self, rank: int, world: int, threads: int):
        self.rank, self.world = rank, world
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)

    def __repr__(self) -> str:  # Ray prefixes this worker's log lines with it
        return f"rank{self.rank}"

    def placement(self) -> tuple[str, str, list[str]]:
        """(node id, node address, this actor's GPU ids)."""
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), \
            [str(g) for g in ray.get_gpu_ids()]

    def free_port(self) -> int:
        from parallel.process_group import free_port

        return free_port()

    def run(self, job: Job, master_addr: str, master_port: int, visible_gpus: list[str],
            local_rank: int) -> dict[str, Any]:
        from parallel.process_group import init_distributed, shutdown_distributed
        from trainer.loop import train

        if visible_gpus:  # every GPU of the group on this node, so NCCL can use peer-to-peer links
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible_gpus)
        os.environ.update(job.cfg.cluster.env)
        init_distributed(self.rank, self.world, master_addr, master_port, job.cfg.cluster.timeout_s, local_rank)
        try:
            return train(job)
        finally:
            shutdown_distributed()


class WorkerGroup:
    def __init__(self, job: Job, block: int, timeout_s: float = 600):
        cfg = job.cfg
        use_gpu = job.target.device == "cuda"
        world = cfg.cluster.workers
        bundle = {"CPU": cfg.cluster.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
        self.pgs = [placement_group([dict(bundle) for _ in range(block)], strategy="STRICT_PACK")
                    for _ in range(world // block)]
        try:
            ray.get([pg.ready() for pg in self.pgs], timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            for pg in self.pgs:
                remove_placement_group(pg)
            raise PlacementError(f"could not place {world // block} group(s) of {block} workers × {bundle} "
                                 f"with each group on one node within {timeout_s:.0f} s") from None
        self.workers = [
            TrainWorker.options(
                num_cpus=cfg.cluster.cpus_per_worker, num_gpus=1 if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pgs[i // block], placement_group_bundle_index=i % block),
            ).remote(i, world, cfg.cluster.cpus_per_worker)
            for i in range(world)
        ]
        self.job = job
        self.places: list[tuple[str, str, list[str]]] = []

    def run(self) -> list[dict[str, Any]]:
        self.places = places = ray.get([w.placement.remote() for w in self.workers])
        node_gpus: dict[str, list[str]] = {}
        for node, _, gpus in places:
            node_gpus.setdefault(node, []).extend(gpus)
        master_addr, master_port = places[0][1], ray.get(self.workers[0].free_port.remote())
        by_node: dict[str, list[int]] = {}
        for rank, (node, _, _) in enumerate(places):
            by_node.setdefault(node, []).append(rank)
        print("placement: " + "; ".join(f"node {node[:8]}: ranks {ranks}" for node, ranks in by_node.items()),
              flush=True)
        refs = []
        for worker, (node, _, gpus) in zip(self.workers, places):
            visible = sorted(node_gpus[node], key=int)
            local_rank = visible.index(gpus[0]) if gpus else 0
            refs.append(worker.run.remote(self.job, master_addr, master_port, visible, local_rank))
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        pending = list(refs)
        while pending:  # surface the first failure at once instead of waiting on the survivors
            # (a wait of a second at a time: between waits Python raises a Ctrl-C's KeyboardInterrupt,
            # which a blocking wait on a loaded machine was seen to hold back until the run ended)
            done, pending = ray.wait(pending, num_returns=1, timeout=1.0)
            if not done:
                continue
            try:
                ray.get(done[0])
            except ray.exceptions.RayActorError as err:
                raise WorkerFailure(rank_of[done[0]], None, str(err)) from None
            except ray.exceptions.RayTaskError as err:
                raise WorkerFailure(rank_of[done[0]], err.cause, str(err)) from None
        return ray.get(refs)

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        for pg in self.pgs:
            remove_placement_group(pg)
