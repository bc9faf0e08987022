"""Shared fixtures: a small real corpus (a few stdlib packages) prepared once per session."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from trainer.prepare import SourceOptions, prepare

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """json/, email/ and logging/ of the standard library, byte tokens (≈ 60 documents)."""
    out = tmp_path_factory.mktemp("data") / "small"
    opts = SourceOptions(include=["json/*.py", "email/*.py", "logging/*.py"], exclude=["site-packages/*"])
    prepare(STDLIB, out, opts=opts, show_progress=False)
    return out


@pytest.fixture(scope="session")
def uneven_dataset(tmp_path_factory) -> Path:
    """Standard-library text cut at lognormal lengths (median ≈ 120 bytes, long tail): documents of
    very different lengths, as a .jsonl source."""
    import json

    import numpy as np

    folder = tmp_path_factory.mktemp("uneven")
    text = "".join(p.read_text() for p in sorted((STDLIB / "json").glob("*.py")))
    cuts = np.cumsum(np.random.default_rng(0).lognormal(np.log(120), 1.0, 400).astype(int) + 1)
    pieces = [text[a:b] for a, b in zip([0, *cuts[:-1]], cuts) if text[a:b].strip()]
    src = folder / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": p}) + "\n" for p in pieces))
    prepare(src, folder / "data", show_progress=False)
    return folder / "data"


def tiny_overrides(dataset: Path, run_dir: Path, name: str = "t") -> list[str]:
    """A tiny model and short micro-batches: each step takes well under a second on one core."""
    return [f"data.path={dataset}", f"run_dir={run_dir}", f"name={name}", "model=tiny",
            "data.context_len=256", "data.tokens_per_microbatch=512", "train.global_microbatches=4",
            "train.log_every=1000", "optim.warmup_steps=3", "optim.lr=3.0e-3", "checkpoint.every=5",
            "cluster.workers=2", "cluster.timeout_s=120"]
