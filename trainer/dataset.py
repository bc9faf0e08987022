"""Read access to a prepared dataset: its manifest, memory-mapped Arrow IPC shards, zero-copy token slices.

A dataset that cannot be read — no manifest, a manifest that is not JSON, a shard that is missing,
truncated or holds other rows than the manifest says — is a `DatasetError` naming the file, never
a traceback from deep inside pyarrow.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

MANIFEST = "index.json"
NO_SPANS = np.zeros(0, dtype=np.int32)


class DatasetError(ValueError):
    """A prepared dataset that cannot be read as it is; its message is one line."""


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{folder} is not a prepared Loom dataset (no {MANIFEST}); run `loom prepare`")
    again = "prepare the dataset again (loom prepare … --force)"
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise DatasetError(f"{path} is damaged: not valid JSON ({err}); {again}") from None
    if not (isinstance(manifest, dict) and isinstance(manifest.get("shards"), list)
            and isinstance(manifest.get("tokenizer"), dict) and "vocab_size" in manifest["tokenizer"]):
        raise DatasetError(f"{path} is damaged: no shard list or tokenizer; {again}")
    return manifest


def open_shard(folder: Path, shard: dict) -> tuple[pa.MemoryMappedFile, pa.ipc.RecordBatchFileReader]:
    """A shard's memory map and Arrow reader, checked against the manifest's row count."""
    path = folder / shard["file"]
    try:
        source = pa.memory_map(str(path), "r")
        reader = pa.ipc.open_file(source)
        rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except FileNotFoundError:
        raise DatasetError(f"{path} is missing; prepare the dataset again (loom prepare … --force)") from None
    except (pa.ArrowException, OSError) as err:
        raise DatasetError(f"{path} is damaged ({str(err).splitlines()[0]}); "
                           f"prepare the dataset again (loom prepare … --force)") from None
    if rows != shard["documents"]:
        raise DatasetError(f"{path} holds {rows:,} documents, its manifest says {shard['documents']:,}; "
                           f"prepare the dataset again (loom prepare … --force)")
    return source, reader


def check_dataset_files(folder: str | Path) -> dict:
    """The manifest, after opening every shard it lists (a footer and row-count read each)."""
    manifest = read_manifest(folder)
    for shard in manifest["shards"]:
        open_shard(Path(folder), shard)[0].close()
    return manifest


class TokenDataset:
    """All documents of a prepared dataset, addressed by a global index 0..N-1.

    Each shard file is memory-mapped; a document's tokens are a numpy view into the map,
    so reading touches only the pages of the documents asked for. An instruction example also
    has the [start, end) spans of its tokens the loss sees (`supervised`).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self._maps: list[pa.MemoryMappedFile] = []
        self._values: list[np.ndarray] = []  # per record batch: flat int32 tokens
        self._offsets: list[np.ndarray] = []  # per record batch: row offsets into _values
        self._spans: list[tuple[np.ndarray, np.ndarray]] = []  # per record batch: span offsets, values
        lengths = []
        for shard in self.manifest["shards"]:
            source, reader = open_shard(self.folder, shard)
            self._maps.append(source)
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                tokens = batch.column("tokens")
                self._offsets.append(tokens.offsets.to_numpy())
                self._values.append(tokens.values.to_numpy(zero_copy_only=True))
                spans = batch.column("supervised") if "supervised" in batch.schema.names else None
                self._spans.append((spans.offsets.to_numpy(), spans.values.to_numpy(zero_copy_only=True))
                                   if spans is not None else (np.zeros(batch.num_rows + 1, np.int32), NO_SPANS))
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

    def _locate(self, doc: int) -> tuple[int, int]:
        b = int(np.searchsorted(self._batch_start, doc, side="right")) - 1
        return b, doc - int(self._batch_start[b])

    def tokens(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens [start, stop) of document `doc`, as a read-only view."""
        b, row = self._locate(doc)
        lo, hi = int(self._offsets[b][row]), int(self._offsets[b][row + 1])
        stop = hi - lo if stop is None else min(stop, hi - lo)
        return self._values[b][lo + start: lo + stop]

    def supervised(self, doc: int) -> np.ndarray:
        """[start, end) spans of the tokens the loss sees, as an [n, 2] array; empty: all of them."""
        b, row = self._locate(doc)
        offsets, values = self._spans[b]
        return values[int(offsets[row]): int(offsets[row + 1])].reshape(-1, 2)
