"""Read access to a prepared dataset: memory-mapped Arrow IPC shards, zero-copy token slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from trainer.prepare import read_manifest


class TokenDataset:
    """All documents of a prepared dataset, addressed by a global index 0..N-1.

    Each shard file is memory-mapped; a document's tokens are a numpy view into the map,
    so reading touches only the pages of the documents asked for.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self._maps: list[pa.MemoryMappedFile] = []
        self._values: list[np.ndarray] = []  # per record batch: flat int32 tokens
        self._offsets: list[np.ndarray] = []  # per record batch: row offsets into _values
        lengths = []
        for shard in self.manifest["shards"]:
            source = pa.memory_map(str(self.folder / shard["file"]), "r")
            self._maps.append(source)
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                tokens = batch.column("tokens")
                self._offsets.append(tokens.offsets.to_numpy())
                self._values.append(tokens.values.to_numpy(zero_copy_only=True))
                lengths.append(batch.column("length").to_numpy())
        self.lengths = np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
        counts = np.array([len(o) - 1 for o in self._offsets], dtype=np.int64)
        self._batch_start = np.concatenate([[0], np.cumsum(counts)])

    def __len__(self) -> int:
        return int(self.lengths.size)

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def fingerprint(self) -> str:
        return str(self.manifest["source"]["fingerprint"])

    def tokens(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens [start, stop) of document `doc`, as a read-only view."""
        b = int(np.searchsorted(self._batch_start, doc, side="right")) - 1
        row = doc - int(self._batch_start[b])
        lo, hi = int(self._offsets[b][row]), int(self._offsets[b][row + 1])
        stop = hi - lo if stop is None else min(stop, hi - lo)
        return self._values[b][lo + start: lo + stop]
