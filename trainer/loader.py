"""Turns sampled pieces into packed tensors and serves each rank its micro-batches, read ahead.

A packed micro-batch is one token stream of several documents; `cu_seqlens` marks their
boundaries, positions restart at 0 in every document, and each label is the next token of the
same document (the last token of a document has none: -100). In an instruction example only the
tokens inside its supervised spans are labels.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from trainer.dataset import TokenDataset
from trainer.loss import IGNORE
from trainer.sampler import PackedSampler, Piece


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # [T] int64
    labels: torch.Tensor  # [T] int64, IGNORE where there is no next token
    positions: torch.Tensor  # [T] int64, restarting at each document
    cu_seqlens: torch.Tensor  # [docs + 1] int32
    max_seqlen: int
    pieces: list[Piece] = field(default_factory=list)
    real_tokens: int = -1  # tokens before padding (-1: no padding)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.numel())

    @property
    def num_real(self) -> int:
        """Tokens of documents (padding and the idle micro-batch of adaptive SP excluded)."""
        if not self.pieces:
            return 0
        return self.num_tokens if self.real_tokens < 0 else self.real_tokens

    def num_labels(self) -> int:
        return int((self.labels != IGNORE).sum())

    def doc_lengths(self) -> list[int]:
        return [p.length for p in self.pieces]

    def to(self, device: torch.device | str) -> "PackedBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PackedBatch(move(self.tokens), move(self.labels), move(self.positions),
                           move(self.cu_seqlens), self.max_seqlen, self.pieces, self.real_tokens)


def build_batch(dataset: TokenDataset, pieces: list[Piece]) -> PackedBatch:
    total = sum(p.length for p in pieces)
    tokens = np.empty(total, dtype=np.int64)
    labels = np.full(total, IGNORE, dtype=np.int64)
    positions = np.empty(total, dtype=np.int64)
    cu = np.zeros(len(pieces) + 1, dtype=np.int32)
    at = 0
    for i, p in enumerate(pieces):
        window = dataset.tokens(p.doc, p.start, p.start + p.length + 1)
        tokens[at: at + p.length] = window[: p.length]
        nxt = window[1:]
        labels[at: at + nxt.size] = _supervised(nxt, p.start + 1, dataset.supervised(p.doc))
        positions[at: at + p.length] = np.arange(p.length)
        at += p.length
        cu[i + 1] = at
    return PackedBatch(torch.from_numpy(tokens), torch.from_numpy(labels), torch.from_numpy(positions),
                       torch.from_numpy(cu), max((p.length for p in pieces), default=0), pieces)


def _supervised(targets: np.ndarray, first: int, spans: np.ndarray) -> np.ndarray:
    """`targets` (tokens `first`, `first`+1, … of a document) with those outside `spans` ignored."""
    if spans.size == 0:
        return targets
    index = np.arange(first, first + targets.size)
    keep = ((index[:, None] >= spans[:, 0]) & (index[:, None] < spans[:, 1])).any(axis=1)
    return np.where(keep, targets, IGNORE)


class StepLoader:
    """Yields this data-parallel rank's micro-batches step by step; a thread reads ahead.

    `state_dict()` describes the position after the last step handed out, not the read-ahead
    position, so a checkpoint taken between steps resumes with exactly the next step.
    """

    def __init__(self, dataset: TokenDataset, sampler: PackedSampler, dp_rank: int, dp_size: int,
                 prefetch: int = 4):
        self.dataset = dataset
        self.sampler = sampler
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.prefetch = max(1, prefetch)
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wait_s = 0.0  # time the trainer spent blocked on data since the last reset
        self._peeked = None
        self.step_pieces: list[Piece] = []  # every rank's pieces of the step last handed out

    def _produce(self, epoch: int, cursor: int, out: queue.Queue, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                batches, epoch, cursor = self.sampler.take(epoch, cursor, self.sampler.global_microbatches)
                mine = PackedSampler.shard(batches, self.dp_rank, self.dp_size)
                everyone = [p for pieces in batches for p in pieces]
                item = ([build_batch(self.dataset, pieces) for pieces in mine], epoch, cursor, everyone)
                while not stop.is_set():
                    try:
                        out.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except Exception as err:  # noqa: BLE001 - handed to the consumer, which raises it
            out.put(err)

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._thread = threading.Thread(target=self._produce, daemon=True, name="loom-loader",
                                        args=(self.sampler.epoch, self.sampler.cursor, self._queue, self._stop))
        self._thread.start()

    def _fetch(self):
        if self._thread is None:
            self._start()
        t0 = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - t0
        if isinstance(item, Exception):
            raise item
        return item

    def next_step(self) -> list[PackedBatch]:
        item = self._peeked or self._fetch()
        self._peeked = None
        batches, self.sampler.epoch, self.sampler.cursor, self.step_pieces = item
        return batches

    def peek(self) -> list[PackedBatch]:
        """The step after the last one handed out, without handing it out (the state stays)."""
        if self._peeked is None:
            self._peeked = self._fetch()
        return self._peeked[0]

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
        self._peeked = None

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.close()
        self.sampler.load_state_dict(state)
