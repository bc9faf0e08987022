"""A group of Ray actors, one per training process, placed by one placement group.

Bundles are packed by node, so consecutive ranks (the tp/sp neighbours of `ParallelDims`) share
a node. Rank 0's actor sits on bundle 0; its node address and a free port there become
MASTER_ADDR/PORT, and every actor joins the process group over TCP.
"""

from __future__ import annotations

import os
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from trainer.config import JobConfig


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
        from launch.distributed import node_ip

        return ray.get_runtime_context().get_node_id(), node_ip(), [str(g) for g in ray.get_gpu_ids()]

    def free_port(self) -> int:
        from launch.distributed import free_port

        return free_port()

    def run(self, cfg_dict: dict[str, Any], master_addr: str, master_port: int,
            visible_gpus: list[str], local_rank: int) -> dict[str, Any]:
        from launch.distributed import init_distributed, shutdown_distributed
        from trainer.config import config_from_dict
        from trainer.loop import train

        if visible_gpus:  # every GPU of the group on this node, so NCCL can use peer-to-peer links
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(visible_gpus)
        cfg = config_from_dict(cfg_dict)
        init_distributed(self.rank, self.world, master_addr, master_port, cfg.cluster.timeout_s, local_rank)
        try:
            return train(cfg)
        finally:
            shutdown_distributed()


class WorkerGroup:
    def __init__(self, cfg: JobConfig, use_gpu: bool):
        world = cfg.cluster.workers
        bundle = {"CPU": cfg.cluster.cpus_per_worker}
        if use_gpu:
            bundle["GPU"] = 1
        self.pg = placement_group([dict(bundle) for _ in range(world)], strategy="PACK")
        ray.get(self.pg.ready(), timeout=600)
        self.workers = [
            TrainWorker.options(
                num_cpus=cfg.cluster.cpus_per_worker, num_gpus=1 if use_gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(i, world, cfg.cluster.cpus_per_worker)
            for i in range(world)
        ]
        self.cfg = cfg

    def run(self) -> list[dict[str, Any]]:
        places = ray.get([w.placement.remote() for w in self.workers])
        node_gpus: dict[str, list[str]] = {}
        for node, _, gpus in places:
            node_gpus.setdefault(node, []).extend(gpus)
        master_addr, master_port = places[0][1], ray.get(self.workers[0].free_port.remote())
        refs = []
        for worker, (node, _, gpus) in zip(self.workers, places):
            visible = sorted(node_gpus[node], key=int)
            local_rank = visible.index(gpus[0]) if gpus else 0
            refs.append(worker.run.remote(self.cfg.to_dict(), master_addr, master_port, visible, local_rank))
        pending = list(refs)
        while pending:  # surface the first failure at once instead of waiting on the survivors
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done[0])
        return ray.get(refs)

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        remove_placement_group(self.pg)
