"""Runs a function on N local processes joined by a gloo process group (tests only).

`run_ranks(fn, world, *args)` spawns the ranks, calls `fn(rank, world, *args)` in each and
returns every rank's return value (picklable) in rank order. A rank that raises fails the call
with its traceback; one that dies fails it too, and the others are killed at once rather than
left waiting in a collective.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from parallel.process_group import free_port, init_distributed, shutdown_distributed


def _entry(rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    try:
        init_distributed(rank, world, "127.0.0.1", port, timeout_s=int(os.environ.get("LOOM_TEST_TIMEOUT", "120")),
                         local_rank=rank)
        result = fn(rank, world, *args)
        torch.save({"ok": result}, Path(out_dir) / f"rank{rank}.pt")
        shutdown_distributed()
    except BaseException:  # noqa: BLE001 - reported to the parent
        torch.save({"error": traceback.format_exc()}, Path(out_dir) / f"rank{rank}.pt")
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def run_ranks(fn: Callable, world: int, *args: Any) -> list[Any]:
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.get_context("spawn")
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world, port, out, fn, args)) for r in range(world)]
        for p in procs:
            p.start()
        running = {p.sentinel: (r, p) for r, p in enumerate(procs)}
        while running:
            for sentinel in wait(list(running)):
                r, p = running.pop(sentinel)
                # a rank that died before saving its result leaves the others waiting on it: stop them
                # (one that crashed tearing down a broken process group after saving it has finished)
                if p.exitcode != 0 and not (Path(out) / f"rank{r}.pt").exists():
                    for _, other in running.values():
                        other.kill()
        for p in procs:
            p.join()
        items = [torch.load(Path(out) / f"rank{r}.pt", weights_only=False)
                 if (Path(out) / f"rank{r}.pt").exists() else None for r in range(world)]
        errors = [f"rank {r} failed:\n{item['error']}" for r, item in enumerate(items) if item is not None and "error" in item]
        if errors:
            raise RuntimeError("\n".join(errors))
        for r, item in enumerate(items):
            if item is None:
                raise RuntimeError(f"rank {r} died (exit code {procs[r].exitcode}) without a result")
        return [item["ok"] for item in items]
