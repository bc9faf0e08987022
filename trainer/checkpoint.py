"""Sharded, atomic checkpoints with torch.distributed.checkpoint (DCP), on a local path or an fsspec URL.

A checkpoint of step N is written into `step-N.tmp/`; when every rank has written its shards
(and, for async saves, the background write has finished), rank 0 renames the folder to
`step-N/` and then adds `COMPLETE.json` — with the size and SHA-256 of every file. Only folders
with that marker are loaded, and only if the marker reads and every file still matches it: a
damaged checkpoint makes the resume fall back to the previous one, with a warning naming it. When
checkpoints exist but none is intact, the run stops with one line listing them, unless
`checkpoint.damaged: start_over` says to set them aside (`step-N.damaged/`) and begin again. The
last `keep_last` are kept.

The folder is a local (shared) path or any fsspec URL — `s3://bucket/run`, `gs://…`,
`file:///…` — so that the nodes of a multi-node job can share one store; DCP picks its fsspec
reader and writer for URLs by itself.

Contents: model and optimizer (sharded, resharding on load), LR schedule, data-loader state
(global), step, config, and each rank's RNG states (`rng/rank-R.pt`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

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


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def join(location: str | Path, *names: str) -> str:
    """A location inside another, keeping the URL form of a URL."""
    return "/".join([str(location).rstrip("/"), *names])


def storage(location: str | Path) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem holding a location and the location's path on it."""
    return fsspec.core.url_to_fs(str(location))


def read_text(location: str) -> str:
    with fsspec.open(location, "r") as fh:
        return fh.read()


def complete_checkpoints(folder: str | Path) -> list[tuple[int, str]]:
    """(step, location) of complete checkpoints, oldest first."""
    fs, root = storage(folder)
    if not fs.isdir(root):
        return []
    found = []
    for entry in fs.ls(root, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        match = STEP_DIR.match(name)
        if match and fs.isfile(f"{entry.rstrip('/')}/{MARKER}"):
            found.append((int(match.group(1)), join(folder, name)))
    return sorted(found)


def file_digests(location: str | Path) -> dict[str, dict[str, Any]]:
    fs, root = storage(location)
    root = root.rstrip("/")
    digests = {}
    for path, info in sorted(fs.find(root, detail=True).items()):
        name = path[len(root) + 1:]
        if name == MARKER:
            continue
        h = hashlib.sha256()
        with fs.open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        digests[name] = {"size": int(info["size"]), "sha256": h.hexdigest()}
    return digests


class CheckpointError(RuntimeError):
    """Checkpoints that cannot be resumed as they are; its message is one line."""


def probe_writable(folder: str | Path) -> None:
    """Raises CheckpointError unless the folder (a path or URL) can be created and written to."""
    probe = join(folder, f".write-probe-{os.getpid()}")
    try:
        fs, root = storage(folder)
        fs.makedirs(root, exist_ok=True)
        with fsspec.open(probe, "wb") as fh:
            fh.write(b"loom")
        fs.rm(storage(probe)[1])
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint folder {folder} is not writable ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else 'no permission'})") from None


def read_marker(location: str | Path) -> dict[str, Any]:
    return json.loads(read_text(join(location, MARKER)))


def damage(location: str | Path) -> str:
    """Why a complete checkpoint can no longer be trusted ('' if it can)."""
    try:
        expected = read_marker(location)["files"]
    except (ValueError, KeyError, TypeError, OSError) as err:
        return f"{MARKER} is unreadable ({type(err).__name__})"
    found = file_digests(location)
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
    def __init__(self, folder: str | Path, keep_last: int, group: dist.ProcessGroup | None = None,
                 async_save: bool = False, damaged: str = "stop"):
        self.folder = str(folder)
        self.damaged = damaged
        self.fs, _ = storage(self.folder)
        self.keep_last = keep_last
        self.group = group
        self.async_save = async_save
        self.rank = dist.get_rank()
        self._pending: tuple[Any, int, str, dict] | None = None

    def _path(self, location: str) -> str:
        return storage(location)[1]

    def latest(self) -> tuple[int, str, dict[str, Any]] | None:
        """(step, location, marker) of the newest complete checkpoint whose files match their
        checksums; None when there is none (rank 0 checks, every rank gets its answer)."""
        answer: list = [None]
        if self.rank == 0:
            answer[0] = self._choose()
        dist.broadcast_object_list(answer, src=0, group=self.group)
        if isinstance(answer[0], str):
            raise CheckpointError(answer[0])
        return answer[0]

    def _choose(self) -> tuple[int, str, dict[str, Any]] | str | None:
        damaged = []
        for step, location in reversed(complete_checkpoints(self.folder)):
            problem = damage(location)
            if not problem:
                return step, location, read_marker(location)
            damaged.append((location, problem))
            print(f"warning: checkpoint step {step} at {location} is damaged ({problem}); trying an older one",
                  flush=True)
        if not damaged:
            return None
        if self.damaged == "stop":
            listed = "; ".join(f"{location}: {problem}" for location, problem in damaged)
            return (f"every checkpoint is damaged ({listed}); restore them, or pass "
                    f"checkpoint.damaged=start_over to set them aside and train from step 0")
        for location, _ in damaged:
            self.fs.mv(self._path(location), self._path(location) + ".damaged", recursive=True)
        print(f"checkpoint.damaged=start_over: {len(damaged)} damaged checkpoint(s) set aside as *.damaged; "
              f"training from step 0", flush=True)
        return None

    def save(self, step: int, app_state: dict[str, Any], meta: dict[str, Any],
             rank0_files: Callable[[str], None] | None = None,
             every_rank_files: Callable[[Path], None] | None = None) -> None:
        """Saves a checkpoint with `meta` in its marker; `rank0_files(location)` lets rank 0 add files
        of its own (the ledger), `every_rank_files(folder)` every rank (an engine's collective save
        into a local folder, e.g. DeepSpeed's)."""
        self.wait()
        tmp = join(self.folder, f"step-{step:07d}.tmp")
        if self.rank == 0:
            if self.fs.exists(self._path(tmp)):
                self.fs.rm(self._path(tmp), recursive=True)
            self.fs.makedirs(self._path(join(tmp, "rng")), exist_ok=True)
            if rank0_files:
                rank0_files(tmp)
        dist.barrier(group=self.group)
        with fsspec.open(join(tmp, "rng", f"rank-{self.rank}.pt"), "wb") as fh:
            torch.save(rng_state(), fh)
        if every_rank_files:
            every_rank_files(Path(tmp))
        meta = {"step": step, "world_size": dist.get_world_size(), **meta, "time": time.time()}
        if self.async_save:
            future = dcp.async_save(app_state, checkpoint_id=tmp, process_group=self.group)
            self._pending = (future, step, tmp, meta)
        else:
            dcp.save(app_state, checkpoint_id=tmp, process_group=self.group)
            self._finalize(step, tmp, meta)

    def wait(self) -> None:
        """Finishes an async save still in flight (rename and marker); every rank calls it at
        the same point of the loop, since it ends with barriers."""
        if self._pending is not None:
            future, step, tmp, meta = self._pending
            self._pending = None
            future.result()
            self._finalize(step, tmp, meta)

    def _finalize(self, step: int, tmp: str, meta: dict) -> None:
        dist.barrier(group=self.group)
        if self.rank == 0:
            final = join(self.folder, f"step-{step:07d}")
            if self.fs.exists(self._path(final)):
                self.fs.rm(self._path(final), recursive=True)
            self.fs.mv(self._path(tmp), self._path(final), recursive=True)
            # the marker last: a folder without it (a crash in between) is never loaded
            with fsspec.open(join(final, MARKER), "w") as fh:
                fh.write(json.dumps({**meta, "files": file_digests(final)}, indent=1))
            for _, old in complete_checkpoints(self.folder)[: -self.keep_last]:
                self.fs.rm(self._path(old), recursive=True)
        dist.barrier(group=self.group)

    def load(self, location: str, app_state: dict[str, Any]) -> dict[str, Any]:
        """Loads `location` into app_state in place; restores this rank's RNG; returns the marker."""
        dcp.load(app_state, checkpoint_id=location, process_group=self.group)
        rng_file = join(location, "rng", f"rank-{self.rank}.pt")
        if self.fs.exists(self._path(rng_file)):
            with fsspec.open(rng_file, "rb") as fh:
                set_rng_state(torch.load(fh, weights_only=False))
        return json.loads(read_text(join(location, MARKER)))
