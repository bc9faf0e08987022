"""`loom prepare`: raw text → tokenized Arrow IPC shards plus an `index.json` manifest.

Sources: a folder of text files (one document per file), a single text file, a `.jsonl` file
(one JSON object per line) or a `.parquet` file. A row of the last two is a document (`--text-key`)
or an instruction example — `prompt` and `completion`, or chat `messages` — whose tokens come with
the spans the loss sees (`trainer.instructions`). The dataset is written into a temporary folder
beside OUT and renamed into place only when complete, so an interrupted run leaves no half
dataset. Documents that are empty or not valid UTF-8 (and JSON lines that do not parse or lack
the text field) are counted per reason and reported, never dropped silently.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from trainer.dataset import MANIFEST, NO_SPANS, DatasetError, read_manifest
from trainer.instructions import InstructionError, chat_example, pair_example
from trainer.tokenizer import Tokenizer, TokenizerError, load_tokenizer

FORMAT_VERSION = 1
SCHEMA = pa.schema([
    ("tokens", pa.list_(pa.int32())),
    ("length", pa.int32()),
    ("doc_id", pa.int64()),
    ("source", pa.string()),
    ("supervised", pa.list_(pa.int32())),  # [start, end) token spans the loss sees, flattened; empty: all
])
EXAMPLE_KEYS = (("messages",), ("prompt", "completion"))


class PrepareError(RuntimeError):
    """A problem with the source or the output path; its message is one line."""


@dataclass
class SourceOptions:
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    text_key: str = "text"


@dataclass
class RawDocument:
    source: str  # file path, or path:line / path:row
    text: str | None  # None when the row was unusable (or is an example)
    problem: str = ""  # empty | undecodable | bad_json | no_text | bad_example
    example: dict | None = None  # an instruction row: {"messages": …} or {"prompt": …, "completion": …}


def _row(where: str, obj: object, key: str) -> RawDocument:
    """A JSON object or table row: an instruction example when it has their fields, else a document."""
    if isinstance(obj, dict):
        for keys in EXAMPLE_KEYS:
            if all(obj.get(k) is not None for k in keys):
                return RawDocument(where, None, example={k: obj[k] for k in keys})
    text = obj.get(key) if isinstance(obj, dict) else None
    return RawDocument(where, text) if isinstance(text, str) else RawDocument(where, None, "no_text")


def _decode(raw: bytes, source: str) -> RawDocument:
    try:
        return RawDocument(source, raw.decode("utf-8"))
    except UnicodeDecodeError:
        return RawDocument(source, None, "undecodable")


def _folder_files(root: Path, opts: SourceOptions, out: Path | None) -> list[Path]:
    """The files of a folder that the globs select, leaving out the dataset being written into it
    (`out` and its temporary siblings) when OUT lies inside SRC."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        if out is not None:
            dirnames[:] = [d for d in dirnames if not _is_output(Path(dirpath) / d, out)]
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if not any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in opts.include):
                continue
            if any(fnmatch.fnmatch(rel, p) for p in opts.exclude):
                continue
            files.append(path)
    return files


def _read_jsonl(path: Path, key: str) -> Iterator[RawDocument]:
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                yield RawDocument(where, None, "bad_json")
                continue
            yield _row(where, obj, key)


def _is_output(path: Path, out: Path) -> bool:
    return path.resolve() == out.resolve() or (path.parent.resolve() == out.parent.resolve()
                                               and path.name.startswith(f".{out.name}."))


def _read_parquet(path: Path, key: str) -> Iterator[RawDocument]:
    file = pq.ParquetFile(path)
    names = file.schema_arrow.names
    columns = [c for c in (key, *(k for keys in EXAMPLE_KEYS for k in keys)) if c in names]
    start = 0
    for group in range(file.num_row_groups):
        try:
            rows = file.read_row_group(group, columns=columns).to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise PrepareError(f"{path}: row group {group} cannot be read ({str(err).splitlines()[0]})") from None
        for i, row in enumerate(rows):
            yield _row(f"{path}:{start + i}", row, key)
        start += len(rows)


class Source:
    """A validated source path and how to iterate its documents."""

    def __init__(self, path: str | Path, opts: SourceOptions, out: Path | None = None):
        self.path = Path(path)
        self.opts = opts
        if not self.path.exists():
            raise PrepareError(f"source not found: {self.path}")
        if self.path.is_dir():
            self.kind = "folder"
            self.files = _folder_files(self.path, opts, out)
            if not self.files:
                raise PrepareError(f"no files in {self.path} match --include {' '.join(opts.include)}")
        elif self.path.suffix == ".jsonl":
            self.kind, self.files = "jsonl", [self.path]
        elif self.path.suffix == ".parquet":
            self.kind, self.files = "parquet", [self.path]
            try:
                names = pq.ParquetFile(self.path).schema_arrow.names
            except Exception as err:  # noqa: BLE001 - pyarrow raises several types
                raise PrepareError(f"cannot read parquet file {self.path}: {err}") from None
            if opts.text_key not in names and not any(set(keys) <= set(names) for keys in EXAMPLE_KEYS):
                raise PrepareError(f"parquet file {self.path} has no column '{opts.text_key}' "
                                   f"(columns: {', '.join(names)}); pass --text-key")
        else:
            self.kind, self.files = "file", [self.path]

    def fingerprint(self, tokenizer: Tokenizer) -> str:
        h = hashlib.sha256()
        fields = [self.kind, self.opts.include, self.opts.exclude, self.opts.text_key, tokenizer.name,
                  tokenizer.vocab_size] + ([tokenizer.chat_template] if tokenizer.chat_template else [])
        h.update(json.dumps(fields).encode())
        for f in self.files:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def total(self) -> tuple[int, str]:
        if self.kind == "folder":
            return len(self.files), "files"
        return sum(f.stat().st_size for f in self.files), "B"

    def documents(self, progress: tqdm) -> Iterator[RawDocument]:
        if self.kind in ("folder", "file"):
            for f in self.files:
                yield _decode(f.read_bytes(), str(f))
                progress.update(1 if self.kind == "folder" else f.stat().st_size)
            return
        reader = _read_jsonl if self.kind == "jsonl" else _read_parquet
        size = self.files[0].stat().st_size
        count = 0
        for doc in reader(self.files[0], self.opts.text_key):
            count += 1
            if count % 256 == 0:
                progress.update(min(size, progress.n + 1) - progress.n)
            yield doc
        progress.update(size - progress.n)


class ShardWriter:
    """Writes documents into Arrow IPC files of about `tokens_per_shard` tokens each."""

    def __init__(self, folder: Path, tokens_per_shard: int, rows_per_batch: int = 512):
        self.folder = folder
        self.tokens_per_shard = tokens_per_shard
        self.rows_per_batch = rows_per_batch
        self.shards: list[dict] = []
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._rows: list[tuple[np.ndarray, int, str, np.ndarray]] = []
        self._shard_tokens = 0
        self._shard_docs = 0
        self.documents = 0
        self.tokens = 0
        self.supervised_tokens = 0  # of examples with spans; whole documents count in full

    def add(self, ids: np.ndarray, source: str, spans: np.ndarray = NO_SPANS) -> None:
        """One document (`spans` empty: every token supervised) or example (its [start, end) spans)."""
        if self._writer is None:
            name = f"shard-{len(self.shards):05d}.arrow"
            self._writer = pa.ipc.new_file(str(self.folder / name), SCHEMA)
            self.shards.append({"file": name, "documents": 0, "tokens": 0})
        self._rows.append((ids, self.documents, source, spans))
        self.documents += 1
        self.tokens += ids.size
        self.supervised_tokens += int((spans[1::2] - spans[::2]).sum()) if spans.size else ids.size
        self._shard_tokens += ids.size
        self._shard_docs += 1
        if len(self._rows) >= self.rows_per_batch:
            self._flush()
        if self._shard_tokens >= self.tokens_per_shard:
            self._close_shard()

    def _flush(self) -> None:
        if not self._rows:
            return
        lengths = np.array([r[0].size for r in self._rows], dtype=np.int32)
        offsets = np.zeros(len(self._rows) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = pa.array(np.concatenate([r[0] for r in self._rows]), type=pa.int32())
        batch = pa.record_batch([
            pa.ListArray.from_arrays(pa.array(offsets), values),
            pa.array(lengths),
            pa.array(np.array([r[1] for r in self._rows], dtype=np.int64)),
            pa.array([r[2] for r in self._rows], type=pa.string()),
            pa.array([r[3] for r in self._rows], type=pa.list_(pa.int32())),
        ], schema=SCHEMA)
        self._writer.write_batch(batch)
        self._rows = []

    def _close_shard(self) -> None:
        self._flush()
        self._writer.close()
        self._writer = None
        self.shards[-1].update(documents=self._shard_docs, tokens=self._shard_tokens)
        self._shard_tokens = self._shard_docs = 0

    def close(self) -> None:
        if self._writer is not None:
            self._close_shard()


def _clean_stale(out: Path) -> None:
    """Removes what an interrupted `loom prepare` of OUT left behind: its temporary folder, or the
    old dataset it was swapping out (their process no longer runs)."""
    for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        pid = stale.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)


def prepare(src: str | Path, out: str | Path, tokenizer_spec: str = "bytes",
            opts: SourceOptions | None = None, tokens_per_shard: int = 64 * 2**20,
            force: bool = False, show_progress: bool = True) -> dict:
    """Tokenizes SRC into the dataset folder OUT; returns the manifest."""
    opts = opts or SourceOptions()
    out = Path(out)
    if tokens_per_shard <= 0:
        raise PrepareError(f"--tokens-per-shard must be positive, got {tokens_per_shard}")
    source = Source(src, opts, out)
    try:
        tokenizer = load_tokenizer(tokenizer_spec)
    except TokenizerError as err:
        raise PrepareError(str(err)) from None
    fingerprint = source.fingerprint(tokenizer)
    if out.parent.is_dir():
        _clean_stale(out)
    if out.exists():
        if not (out / MANIFEST).is_file():
            raise PrepareError(f"{out} exists and is not a Loom dataset; choose another output path")
        try:
            old = read_manifest(out)
        except DatasetError as err:
            if not force:
                raise PrepareError(f"{err}; pass --force to replace it") from None
            old = {}
        if old.get("source", {}).get("fingerprint") == fingerprint and not force:
            old["up_to_date"] = True
            return old
        if not force:
            raise PrepareError(f"{out} holds a dataset prepared from other input; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    started = time.time()
    try:
        writer = ShardWriter(tmp, tokens_per_shard)
        skipped: Counter[str] = Counter()
        total, unit = source.total()
        with tqdm(total=total, unit=unit, unit_scale=unit == "B", desc="prepare",
                  disable=None if show_progress else True,  # None: on terminals only
                  dynamic_ncols=True) as bar:
            pending: list[RawDocument] = []
            for doc in source.documents(bar):
                if doc.example is not None:
                    pending.append(doc)
                elif doc.text is None:
                    skipped[doc.problem] += 1
                elif doc.text == "":
                    skipped["empty"] += 1
                else:
                    pending.append(doc)
                if len(pending) >= 256:
                    _encode_into(writer, tokenizer, pending, skipped)
                    pending = []
            _encode_into(writer, tokenizer, pending, skipped)
        writer.close()
        if writer.documents == 0:
            reasons = ", ".join(f"{n} {k}" for k, n in sorted(skipped.items())) or "no rows"
            raise PrepareError(f"no usable documents in {src} ({reasons})")
        manifest = {
            "format": FORMAT_VERSION,
            "documents": writer.documents,
            "tokens": writer.tokens,
            "supervised_tokens": writer.supervised_tokens,
            "shards": writer.shards,
            "skipped": dict(sorted(skipped.items())),
            "tokenizer": {"spec": tokenizer_spec, "name": tokenizer.name,
                          "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
            "source": {"path": str(Path(src).resolve()), "kind": source.kind,
                       "fingerprint": fingerprint},
            "seconds": round(time.time() - started, 2),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():  # --force: swap the complete new dataset in, then drop the old one
            trash = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash)
        else:
            tmp.rename(out)
        return manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _encode_into(writer: ShardWriter, tokenizer: Tokenizer, docs: list[RawDocument],
                 skipped: Counter[str]) -> None:
    """Documents are encoded in one batch; examples one by one, a bad one counted and skipped — but
    `messages` without a chat template stop the run, as every such row would fail."""
    texts = [d for d in docs if d.example is None]
    for doc, ids in zip(texts, tokenizer.encode_batch([d.text for d in texts]) if texts else []):
        writer.add(ids, doc.source)
    for doc in docs:
        if doc.example is None:
            continue
        try:
            if "messages" in doc.example:
                if not tokenizer.chat_template:
                    raise PrepareError(f"{doc.source}: `messages` rows need a tokenizer with a chat template "
                                       "(--tokenizer MODEL_DIR whose tokenizer_config.json has chat_template)")
                ids, spans = chat_example(tokenizer, doc.example["messages"])
            else:
                prompt, completion = doc.example["prompt"], doc.example["completion"]
                if not (isinstance(prompt, str) and isinstance(completion, str)):
                    raise InstructionError("`prompt` and `completion` must be strings")
                ids, spans = pair_example(tokenizer, prompt, completion)
        except InstructionError:
            skipped["bad_example"] += 1
            continue
        if spans.size == 0:
            skipped["bad_example"] += 1  # nothing the loss would see
            continue
        writer.add(ids, doc.source, spans)
