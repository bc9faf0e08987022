"""The process group every rank joins, and turning a hung collective into one clear error.

One group serves CPU tensors over gloo and CUDA tensors over NCCL; it has a timeout, so a
collective that some rank never joins raises instead of hanging forever, and `collective_guard`
turns that into one line naming the rank, the operation and the step. Joining also sets the CUDA
allocator up for micro-batches of varying shape (`ALLOCATOR`), unless the environment (e.g.
`cluster.env`) says otherwise.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist


# Expandable segments grow and shrink mappings instead of caching fixed blocks: a real corpus packs
# micro-batches of other shapes every step, and the default allocator ran out of memory (fragmented)
# where this fits (H200, 64K tokens, two micro-batches: 105 GB).
ALLOCATOR = "expandable_segments:True"
# cuDNN attention builds an execution plan for every sequence length it meets (≈ 150 ms forward +
# backward on an H200), and a corpus's documents rarely repeat a length: a Wikipedia micro-batch with
# five long documents took 1.7–2.1 s instead of 1.0. With this, cuDNN runs dense calls through its
# ragged path and builds one plan per power-of-two length class (kernels measured 7–8% slower);
# `parallel.attention.backends.CudnnDense` sends lengths that are powers of two around it.
CUDNN_ENVIRONMENT = {"TORCH_CUDNN_SDPA_AVOID_RECOMPILE": "1"}


class CollectiveTimeout(RuntimeError):
    """A collective (or point-to-point exchange) that some rank never joined."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_distributed(rank: int, world: int, master_addr: str, master_port: int, timeout_s: int,
                     local_rank: int = 0) -> None:
    """gloo for CPU tensors and NCCL for CUDA tensors in one process group; a hung collective
    raises after `timeout_s` instead of hanging forever."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
                      MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
    if "PYTORCH_ALLOC_CONF" not in os.environ:  # (read when CUDA first allocates, after this)
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", ALLOCATOR)
    for key, value in CUDNN_ENVIRONMENT.items():  # (read at the first cuDNN attention call; a user's setting wins)
        os.environ.setdefault(key, value)
    if torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    else:
        backend = "gloo"
    dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()


def _is_timeout(err: BaseException) -> bool:
    text = str(err)
    return "Timed out" in text or "timed out" in text or "Watchdog caught collective operation timeout" in text


def _operation(err: BaseException) -> str:
    """The torch.distributed call that failed and the Loom code that made it, from the traceback."""
    frames = traceback.extract_tb(err.__traceback__)
    torch_calls = [f for f in frames if "/torch/distributed/" in f.filename.replace("\\", "/")
                   and not f.name.startswith("_") and f.name not in ("wrapper", "wait")]
    ours = [f for f in frames if any(part in f.filename for part in ("/trainer/", "/parallel/", "/launch/"))]
    op = torch_calls[-1].name if torch_calls else "a collective"
    if ours:
        where = ours[-1]
        return f"{op} (called from {os.path.basename(where.filename)}:{where.name})"
    return op


@contextmanager
def collective_guard(rank: int, during: str, timeout_s: int) -> Iterator[None]:
    """Turns a collective's timeout into one error that names the rank, the operation and when."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised unchanged unless it is a timeout
        if not _is_timeout(err):
            raise
        raise CollectiveTimeout(f"rank {rank}: {_operation(err)} timed out after {timeout_s} s during {during}; "
                                f"another rank never joined it") from err
