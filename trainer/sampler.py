"""Length-bucketed packing of documents into token-budget micro-batches, with one global state.

An epoch's plan is a pure function of (document lengths, context length, token budget, bucket
edges, seed, epoch): documents longer than the context are split into pieces at the context
length; pieces are shuffled and ordered by length bucket, longest bucket first; a micro-batch
takes pieces from the long end while they fit its budget of `tokens_per_microbatch` tokens —
pieces of a similar length, so micro-batches of a bucket cost alike — and fills the room left
with the largest pieces that fit, keeping the shortest for the room only they fit (an epoch's
micro-batches 99.6% full on the stdlib corpus and 99.96% on the Wikipedia lengths at 64K, where
buckets alone leave 15–40% empty). A micro-batch lists its pieces longest first. The
micro-batches are shuffled again. Optimizer steps consume `global_microbatches` micro-batches
each from one stream that runs across epochs.

The state is global — (epoch, cursor) in units of micro-batches — never per rank, so a run
saved on one number of data-parallel ranks resumes on another without skipping or repeating.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from trainer.stats import power_of_two_edges


@dataclass(frozen=True)
class Piece:
    doc: int
    start: int
    length: int


@dataclass(frozen=True)
class EpochPlan:
    """Pieces of one epoch and their packing: micro-batch i holds pieces order[bounds[i]:bounds[i+1]]."""

    doc: np.ndarray
    start: np.ndarray
    length: np.ndarray
    order: np.ndarray
    bounds: np.ndarray

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def microbatch(self, i: int) -> list[Piece]:
        idx = self.order[self.bounds[i]: self.bounds[i + 1]]
        return [Piece(int(self.doc[j]), int(self.start[j]), int(self.length[j])) for j in idx]


def split_into_pieces(lengths: np.ndarray, context_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(doc, start, length) of every piece when documents are cut at the context length."""
    counts = -(-lengths // context_len)
    doc = np.repeat(np.arange(lengths.size), counts)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    index_in_doc = np.arange(doc.size) - np.repeat(first, counts)
    start = index_in_doc * context_len
    length = np.minimum(lengths[doc] - start, context_len)
    return doc, start, length


PACKING = "long end, then the largest pieces that fit; longest first"  # part of the stream's fingerprint


def pack_filled(lengths: np.ndarray, buckets: np.ndarray, budget: int) -> list[list[int]]:
    """Micro-batches over positions of `lengths`, ordered by bucket (`buckets`, non-increasing):
    each takes pieces from the long end while they fit, then fills the room left with the largest
    pieces that fit (a bucket at a time, from the largest down, each bucket's pieces in order), so
    that short pieces stay for the room that only they fit; each lists its pieces longest first."""
    n, bucket_of = lengths.tolist(), buckets.tolist()
    stacks: list[list[int]] = [[] for _ in range(max(bucket_of, default=-1) + 1)]
    for i in reversed(range(len(n))):
        stacks[bucket_of[i]].append(i)
    taken = [False] * len(n)

    def next_of(bucket: int) -> int | None:
        stack = stacks[bucket]
        while stack and taken[stack[-1]]:
            stack.pop()
        return stack[-1] if stack else None

    lo, batches = 0, []
    while True:
        while lo < len(n) and taken[lo]:
            lo += 1
        if lo == len(n):
            return batches
        members, used = [], 0
        while lo < len(n) and (not members or used + n[lo] <= budget):
            members.append(lo)
            used += n[lo]
            taken[lo] = True
            while lo < len(n) and taken[lo]:
                lo += 1
        for bucket in reversed(range(len(stacks))):
            while (i := next_of(bucket)) is not None and used + n[i] <= budget:
                members.append(i)
                used += n[i]
                taken[i] = True
        batches.append(sorted(members, key=lambda i: -n[i]))


class PackedSampler:
    def __init__(self, lengths: np.ndarray, context_len: int, tokens_per_microbatch: int,
                 global_microbatches: int, seed: int = 0, bucket_edges: list[int] | None = None,
                 dataset_fingerprint: str = ""):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.size == 0:
            raise ValueError("the dataset has no documents")
        self.context_len = context_len
        self.budget = tokens_per_microbatch
        self.global_microbatches = global_microbatches
        self.seed = seed
        self.edges = np.asarray(bucket_edges or power_of_two_edges(context_len))
        self.pieces = split_into_pieces(self.lengths, context_len)
        self.epoch = 0
        self.cursor = 0
        key = f"{dataset_fingerprint}|{self.lengths.size}|{int(self.lengths.sum())}|{context_len}|" \
              f"{tokens_per_microbatch}|{self.edges.tolist()}|{seed}|{PACKING}"
        self.fingerprint = hashlib.sha256(key.encode()).hexdigest()[:16]
        self._plan = lru_cache(maxsize=2)(self._make_plan)

    def _make_plan(self, epoch: int) -> EpochPlan:
        doc, start, length = self.pieces
        rng = np.random.default_rng([self.seed, epoch])
        bucket = np.searchsorted(self.edges, length, side="left")
        order = np.lexsort((rng.random(doc.size), -bucket))  # longest bucket first, shuffled inside each
        batches = pack_filled(length[order], bucket[order], self.budget)
        segments = [order[batches[i]] for i in rng.permutation(len(batches))]
        bounds = np.concatenate([[0], np.cumsum([s.size for s in segments])])
        return EpochPlan(doc, start, length, np.concatenate(segments), bounds)

    def plan(self, epoch: int) -> EpochPlan:
        return self._plan(epoch)

    def take(self, epoch: int, cursor: int, count: int) -> tuple[list[list[Piece]], int, int]:
        """`count` micro-batches from (epoch, cursor) on; returns them and the state after."""
        out: list[list[Piece]] = []
        while len(out) < count:
            plan = self.plan(epoch)
            if cursor >= len(plan):
                epoch, cursor = epoch + 1, 0
                continue
            out.append(plan.microbatch(cursor))
            cursor += 1
        return out, epoch, cursor

    def next_step(self) -> list[list[Piece]]:
        """The global micro-batches of the next optimizer step; advances the state."""
        batches, self.epoch, self.cursor = self.take(self.epoch, self.cursor, self.global_microbatches)
        return batches

    @staticmethod
    def shard(batches: list[list[Piece]], rank: int, world: int) -> list[list[Piece]]:
        """This data-parallel rank's share of a step's micro-batches (strided)."""
        if len(batches) % world:
            raise ValueError(f"{len(batches)} micro-batches per step do not divide over {world} ranks")
        return batches[rank::world]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.fingerprint:
            raise ValueError("the dataset or packing settings (context_len, tokens_per_microbatch, bucket_edges, "
                             "seed) differ from the checkpoint's; an exact resume is impossible")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
