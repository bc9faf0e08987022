"""Sharded, atomic checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint of step N is written into `step-N.tmp/`; when every rank has written its shards
(and, for async saves, the background write has finished), rank 0 adds `COMPLETE.json` — with
the size and SHA-256 of every file — and renames the folder to `step-N/`. Only folders with that
marker are loaded, and only if every file still matches it: a truncated or missing file makes
the resume fall back to the previous checkpoint, with a warning naming the damaged step. The
last `keep_last` are kept.

Contents: model and optimizer (sharded, resharding on load), LR schedule, data-loader state
(global), step, config, and each rank's RNG states (`rng/rank-R.pt`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

log = logging.getLogger(__name__)
MARKER = "COMPLETE.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


class ModelAndOptimizer(Stateful):
    """Model and optimizer state in DCP's sharded form, keyed by parameter name, so a checkpoint
    reshards between layouts — also between one model and the parts of a pipeline (one optimizer
    per part; the parts' names never overlap)."""

    OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

    def __init__(self, parts: list[torch.nn.Module], optimizers: list[torch.optim.Optimizer]):
        self.parts, self.optimizers = parts, optimizers

    def state_dict(self) -> dict[str, Any]:
        model, optim = {}, {}
        for part, optimizer in zip(self.parts, self.optimizers):
            model_sd, optim_sd = get_state_dict(part, optimizer, options=self.OPTIONS)
            model.update(model_sd)
            optim.update(optim_sd)
        return {"model": model, "optim": optim}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for part, optimizer in zip(self.parts, self.optimizers):
            own_model, own_optim = get_state_dict(part, optimizer, options=self.OPTIONS)
            set_state_dict(part, optimizer, model_state_dict={k: state["model"][k] for k in own_model},
                           optim_state_dict={k: state["optim"][k] for k in own_optim},
                           options=StateDictOptions(strict=True, flatten_optimizer_state_dict=True))


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = STEP_DIR.match(path.name)
        if match and (path / MARKER).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def file_digests(folder: Path) -> dict[str, dict[str, Any]]:
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER):
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        digests[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": h.hexdigest()}
    return digests


def damage(path: Path) -> str:
    """Why a complete checkpoint can no longer be trusted ('' if it can)."""
    expected = json.loads((path / MARKER).read_text()).get("files")
    if expected is None:
        return ""
    found = file_digests(path)
    for name, want in expected.items():
        got = found.get(name)
        if got is None:
            return f"{name} is missing"
        if got["size"] != want["size"]:
            return f"{name} has {got['size']:,} bytes, expected {want['size']:,}"
        if got["sha256"] != want["sha256"]:
            return f"{name} does not match its checksum"
    return ""


class Checkpointer:
    def __init__(self, folder: Path, keep_last: int, group: dist.ProcessGroup | None = None,
                 async_save: bool = False):
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.group = group
        self.async_save = async_save
        self.rank = dist.get_rank()
        self._pending: tuple[Any, int, Path, dict] | None = None

    def latest(self) -> tuple[int, Path] | None:
        """The newest complete checkpoint whose files match their checksums (rank 0 checks, every
        rank gets its answer)."""
        choice: list = [None]
        if self.rank == 0:
            for step, path in reversed(complete_checkpoints(self.folder)):
                problem = damage(path)
                if not problem:
                    choice[0] = (step, str(path))
                    break
                message = f"checkpoint step {step} at {path} is damaged ({problem}); trying an older one"
                log.warning(message)
                print(f"warning: {message}", flush=True)
        dist.broadcast_object_list(choice, src=0, group=self.group)
        return (choice[0][0], Path(choice[0][1])) if choice[0] else None

    def save(self, step: int, app_state: dict[str, Any], config: dict[str, Any],
             rank0_files: Callable[[Path], None] | None = None,
             every_rank_files: Callable[[Path], None] | None = None) -> None:
        """Saves a checkpoint; `rank0_files(folder)` lets rank 0 add files of its own (the ledger),
        `every_rank_files(folder)` every rank (an engine's collective save, e.g. DeepSpeed's)."""
        self.wait()
        tmp = self.folder / f"step-{step:07d}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "rng").mkdir(parents=True)
            if rank0_files:
                rank0_files(tmp)
        dist.barrier(group=self.group)
        torch.save(rng_state(), tmp / "rng" / f"rank-{self.rank}.pt")
        if every_rank_files:
            every_rank_files(tmp)
        meta = {"step": step, "world_size": dist.get_world_size(), "config": config, "time": time.time()}
        if self.async_save:
            future = dcp.async_save(app_state, checkpoint_id=str(tmp), process_group=self.group)
            self._pending = (future, step, tmp, meta)
        else:
            dcp.save(app_state, checkpoint_id=str(tmp), process_group=self.group)
            self._finalize(step, tmp, meta)

    def wait(self) -> None:
        """Finishes an async save still in flight (marker and rename); every rank calls it at
        the same point of the loop, since it ends with barriers."""
        if self._pending is not None:
            future, step, tmp, meta = self._pending
            self._pending = None
            future.result()
            self._finalize(step, tmp, meta)

    def _finalize(self, step: int, tmp: Path, meta: dict) -> None:
        dist.barrier(group=self.group)
        if self.rank == 0:
            (tmp / MARKER).write_text(json.dumps({**meta, "files": file_digests(tmp)}, indent=1))
            final = self.folder / f"step-{step:07d}"
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for _, old in complete_checkpoints(self.folder)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("checkpoint saved: %s", final)
        dist.barrier(group=self.group)

    def load(self, path: Path, app_state: dict[str, Any]) -> dict[str, Any]:
        """Loads `path` into app_state in place; restores this rank's RNG; returns the marker."""
        dcp.load(app_state, checkpoint_id=str(path), process_group=self.group)
        rng_file = path / "rng" / f"rank-{self.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return json.loads((path / MARKER).read_text())
