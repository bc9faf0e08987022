"""Which samples every optimizer step trained on: (document, start) of each piece, all ranks together.

Rank 0 records each step's global pieces and saves the whole history with every checkpoint
(`ledger.npz`); a resumed run loads it from the checkpoint it resumes, so the ledger of the final
checkpoint covers every step of the run across restarts, and shows whether any sample of an
epoch was trained twice or never.
"""

from __future__ import annotations

import fsspec
import numpy as np

from trainer.sampler import Piece

FILE = "ledger.npz"


class Ledger:
    def __init__(self) -> None:
        self.steps: list[int] = []
        self.samples: list[np.ndarray] = []  # per step: [pieces, 2] of (doc, start)

    def record(self, step: int, pieces: list[Piece]) -> None:
        self.steps.append(step)
        self.samples.append(np.array([(p.doc, p.start) for p in pieces], dtype=np.int64).reshape(-1, 2))

    def save(self, folder: str) -> None:
        """Writes the ledger into a checkpoint folder (a path or an fsspec URL)."""
        counts = np.array([s.shape[0] for s in self.samples], dtype=np.int64)
        flat = np.concatenate(self.samples) if self.samples else np.zeros((0, 2), np.int64)
        with fsspec.open(f"{str(folder).rstrip('/')}/{FILE}", "wb") as fh:
            np.savez(fh, steps=np.array(self.steps, dtype=np.int64), counts=counts, samples=flat)

    @classmethod
    def load(cls, folder: str) -> "Ledger":
        ledger = cls()
        location = f"{str(folder).rstrip('/')}/{FILE}"
        fs, path = fsspec.core.url_to_fs(location)
        if fs.isfile(path):
            with fs.open(path, "rb") as fh:
                data = np.load(fh)
                data = {k: data[k] for k in data.files}
            ledger.steps = data["steps"].tolist()
            ledger.samples = np.split(data["samples"], np.cumsum(data["counts"])[:-1]) if len(ledger.steps) else []
        return ledger
