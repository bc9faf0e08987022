"""Heterogeneity-adaptive sequence parallelism's solver: per step, split the ranks into SP groups of
different sizes and give every sequence to one group, minimising the slowest group's time.

Groups are slices of the N ranks, placed largest first, each in the first node with room for it
(`NodeSlots`), so that no group smaller than a node spans two: of power-of-two sizes (1, 2, 4 …
max_group), which then lie aligned and fill every node, or with `group_sizes="any"` of every size
up to a node's GPUs and whole nodes beyond, which can leave ranks of a node unused. A group runs its sequences in micro-batches of at most size ×
tokens_per_gpu tokens (the memory limit); a sequence longer than max_group × tokens_per_gpu fits
nowhere and is an error naming its length.

A plan keeps one grouping for the whole step, or regroups the ranks for each round of
micro-batches (`regroup`): Megatron's dynamic context parallelism does the latter, and it wins
where a few long sequences need large groups that would otherwise idle while the short ones run.
A rank runs its groups in round order; groups of a round are disjoint, so every group's
collectives see the same order on all its ranks.

Solvers:
- greedy (Megatron's dynamic context parallel, widened): every sequence's smallest group size
  that holds it; candidate partitions (each static size, and "one group per long sequence,
  size b for the rest" for every b), tried in order of their lower bound; longest-first
  assignment to the group that would finish the sequence soonest. Milliseconds; warm start,
  fallback and baseline.
- rounds: longest first, each waiting sequence opens a group of its smallest size while ranks
  are free, shorter ones join a group of the round with room (one micro-batch per group and
  round); a round lasts as long as its slowest group.
- MILP (HiGHS through highspy's modelling API): lengths in ≤ 16 buckets, integer counts of each
  bucket per group instance, binary group use, integer micro-batches per group, makespan
  objective, warm-started from the greedy plan and capped in time. Its assignment is re-evaluated
  exactly and kept only if better.
Every plan reports its predicted makespan and a lower bound (the least total rank-time spread
over all ranks, or the slowest sequence on its best group; communication left out, since packing
can hide it). Torch-free: the trainer solves the next step's plan in a separate process with it.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from parallel.planner.cost_model import CostModel


@dataclass
class Group:
    start: int
    size: int
    microbatches: list[list[int]] = field(default_factory=list)  # sequence indices of the step
    round: int = 0  # plans that regroup the ranks: the round of micro-batches this group runs in

    @property
    def ranks(self) -> range:
        return range(self.start, self.start + self.size)


@dataclass
class Plan:
    groups: list[Group]
    predicted_s: float
    lower_bound_s: float = 0.0
    solve_s: float = 0.0
    solver: str = "greedy"

    def groups_of(self, rank: int) -> list[Group]:
        """The groups a rank runs, in round order."""
        return sorted((g for g in self.groups if rank in g.ranks), key=lambda g: g.round)

    @property
    def rounds(self) -> int:
        return 1 + max((g.round for g in self.groups), default=0)

    @property
    def gap(self) -> float:
        return self.predicted_s / self.lower_bound_s - 1 if self.lower_bound_s else 0.0

    def describe(self) -> str:
        """Group sizes and counts, e.g. 1×4+2×2 (one grouping), or each round's: 1×4 | 4×1."""
        def grouping(r: int) -> str:
            sizes = [g.size for g in self.groups if g.round == r]
            return "+".join(f"{sizes.count(s)}×{s}" for s in sorted(set(sizes), reverse=True))
        return " | ".join(grouping(r) for r in range(self.rounds))


FIRST_FIT_WORK = 65536  # waiting sequences × rounds expected, up to which rounds are filled first fit


class SequenceTooLong(ValueError):
    pass


class StepCosts:
    """Per-sequence figures of one step's lengths, per group size, computed once per solve."""

    def __init__(self, planner: "AdaptivePlanner", lengths):
        self.lengths, self.planner = lengths, planner
        self.n = np.asarray(lengths, dtype=np.float64)
        self._attention: dict[int, np.ndarray] = {}
        self._bound: dict[int, np.ndarray] = {}

    def attention(self, size: int) -> np.ndarray:
        if size not in self._attention:
            self._attention[size] = self.planner.cost.attention_time(self.n, size)
        return self._attention[size]

    def bound_times(self, size: int) -> np.ndarray:
        """Each sequence's share of a micro-batch on `size` ranks, communication left out."""
        if size not in self._bound:
            self._bound[size] = self.planner.share_times(self.n, size, with_comm=False)
        return self._bound[size]


def allowed_sizes(largest: int, kind: str, gpus_per_node: int) -> list[int]:
    """The SP group sizes a plan may use, up to `largest`: powers of two, or ("any") every size up to
    a node's GPUs and whole nodes beyond (a group never takes part of a second node)."""
    if kind == "any":
        return [s for s in range(1, largest + 1) if s <= gpus_per_node or s % gpus_per_node == 0]
    return [1 << i for i in range(int(math.log2(largest)) + 1)]


class NodeSlots:
    """The ranks of a round or a step, node by node, as groups take them: a group of up to a node's
    ranks goes to the first node with room for it (first fit; given groups largest first, that is
    first-fit decreasing), a larger one takes whole free nodes in a row."""

    def __init__(self, ranks: int, per_node: int):
        self.per_node = per_node
        self.room = [per_node] * (ranks // per_node) + ([ranks % per_node] if ranks % per_node else [])
        self.size = list(self.room)  # each node's ranks (the last one may have fewer)
        self.free = ranks
        self.first = 0  # nodes before this one are full

    def take(self, size: int) -> int | None:
        """The first rank of a slice of `size` ranks, now taken, or None where none is left."""
        room = self.room
        if size <= self.per_node:
            node = next((k for k in range(self.first, len(room)) if room[k] >= size), None)
            if node is None:
                return None
            start = node * self.per_node + (self.size[node] - room[node])
            room[node] -= size
        else:
            span = -(-size // self.per_node)
            node = next((k for k in range(self.first, len(room) - span + 1)
                         if all(r == self.per_node for r in room[k: k + span])), None)
            if node is None or size != span * self.per_node:
                return None
            start = node * self.per_node
            room[node: node + span] = [0] * span
        self.free -= size
        self._skip_full()
        return start

    def fill(self, size: int) -> int:
        """Takes as many slices of `size` ranks as are left (as `take` would, one by one); how many."""
        if size > self.per_node:
            count = 0
            while self.take(size) is not None:
                count += 1
            return count
        counts = [r // size for r in self.room]  # (first fit fills each node in turn)
        self.room = [r - c * size for r, c in zip(self.room, counts)]
        self.free -= size * sum(counts)
        self._skip_full()
        return sum(counts)

    def _skip_full(self) -> None:
        while self.first < len(self.room) and not self.room[self.first]:
            self.first += 1


def place(sizes: list[int], ranks: int, per_node: int) -> list[int] | None:
    """The first rank of each group (given largest first) on `ranks` ranks, or None where they do
    not all fit without a group spanning nodes."""
    slots = NodeSlots(ranks, per_node)
    starts = [slots.take(size) for size in sizes]
    return None if None in starts else starts


class AdaptivePlanner:
    def __init__(self, cost: CostModel, ranks: int, max_group: int, tokens_per_gpu: int,
                 buckets: int = 16, time_limit_s: float = 1.0, use_milp: bool = True, regroup: str = "auto",
                 group_sizes: str = "powers_of_two"):
        self.cost, self.ranks, self.tokens_per_gpu = cost, ranks, tokens_per_gpu
        self.sizes = allowed_sizes(min(max_group, ranks), group_sizes, cost.hw.gpus_per_node)
        self.max_group = self.sizes[-1]
        self.buckets, self.time_limit_s, self.use_milp = buckets, time_limit_s, use_milp
        self.regroup = regroup  # step: one grouping per step; rounds: one per round; auto: the faster
        self._step: StepCosts | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_step": None}  # (sent to the solver process every step: no cache with it)

    def step_costs(self, lengths) -> StepCosts:
        """The figures of these very lengths (the object a solve passes around), cached."""
        if self._step is None or self._step.lengths is not lengths:
            self._step = StepCosts(self, lengths)
        return self._step

    # ------------------------------------------------------------------ costs of sequences and groups

    def min_sizes(self, lengths) -> np.ndarray:
        """The smallest group size whose memory holds each sequence."""
        n = np.asarray(lengths, dtype=np.int64)
        need = np.maximum(1, -(-n // self.tokens_per_gpu))
        which = np.searchsorted(self.sizes, need)
        if which.size and which.max() >= len(self.sizes):
            length = int(n[np.argmax(which)])
            raise SequenceTooLong(
                f"a sequence of {length:,} tokens fits no SP group: the largest ({self.max_group} ranks × "
                f"{self.tokens_per_gpu:,} tokens per rank) holds {self.max_group * self.tokens_per_gpu:,}")
        return np.asarray(self.sizes, dtype=np.int64)[which]

    def share_times(self, lengths, size: int, with_comm: bool = True) -> np.ndarray:
        """Each sequence's share of a micro-batch on `size` ranks: its own work plus its fraction
        of the micro-batch's fixed cost (vectorised). Without communication it never exceeds the
        sequence's true share (packed sequences hide each other's communication), so bounds use that."""
        n = np.asarray(lengths, dtype=np.float64)
        e = self.cost.hw.microbatch_overhead_s
        total = self.cost.sequence_times(n, size)
        if not with_comm:
            total = total - self.cost.comm_time(n, self.cost.attention_time(n, size), size)
        return total - e + e * n / (size * self.tokens_per_gpu)

    def pack(self, lengths: list[int], seqs: list[int], size: int) -> list[list[int]]:
        """First-fit decreasing into micro-batches of at most size × tokens_per_gpu tokens."""
        cap = size * self.tokens_per_gpu
        used: list[int] = []
        bins: list[list[int]] = []
        for i in sorted(seqs, key=lengths.__getitem__, reverse=True):  # (stable: ties keep their order)
            for b in range(len(bins)):
                if used[b] + lengths[i] <= cap:
                    used[b] += lengths[i]
                    bins[b].append(i)
                    break
            else:
                used.append(lengths[i])
                bins.append([i])
        return bins

    def group_time(self, lengths: list[int], mbs: list[list[int]], size: int) -> float:
        """Seconds of a group's micro-batches."""
        return float(self.group_times(lengths, [(size, mbs)])[0])

    def group_times(self, lengths, groups: list[tuple[int, list[list[int]]]]) -> np.ndarray:
        """Seconds of each (size, micro-batches) group: one vectorised cost-model call per size."""
        costs = self.step_costs(lengths)
        out = np.zeros(len(groups))
        by_size: dict[int, list[int]] = {}
        for g, (size, mbs) in enumerate(groups):
            if any(len(mb) for mb in mbs):
                by_size.setdefault(size, []).append(g)
        for size, members in by_size.items():
            mbs = [mb for g in members for mb in groups[g][1] if len(mb)]
            counts = [sum(1 for mb in groups[g][1] if len(mb)) for g in members]
            sizes = [len(mb) for mb in mbs]
            idx = np.fromiter(itertools.chain.from_iterable(mbs), dtype=np.int64, count=sum(sizes))
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            tokens = np.add.reduceat(costs.n[idx], starts)
            attention = np.add.reduceat(costs.attention(size)[idx], starts)
            times = self.cost.microbatch_times(tokens, attention, size)
            out[members] = np.add.reduceat(times, np.concatenate([[0], np.cumsum(counts)[:-1]]))
        return out

    def place(self, sizes: list[int]) -> list[int] | None:
        """Where groups of these sizes (largest first) start on the ranks, None where they do not fit."""
        return place(sizes, self.ranks, self.cost.hw.gpus_per_node)

    def finish(self, lengths: list[int], sizes: list[int], members: list[list[int]], solver: str) -> Plan:
        """Places the groups (largest first, `place`; the sizes must fit), packs and times them."""
        order = sorted(range(len(sizes)), key=lambda g: -sizes[g])
        starts = self.place([sizes[g] for g in order])
        assert starts is not None, f"groups of sizes {sorted(sizes, reverse=True)} do not fit the ranks"
        groups = [Group(start, sizes[g], self.pack(lengths, members[g], sizes[g])) for g, start in zip(order, starts)]
        makespan = float(self.group_times(lengths, [(g.size, g.microbatches) for g in groups]).max(initial=0.0))
        return Plan(groups, makespan, self.lower_bound(lengths), solver=solver)

    def lower_bound(self, lengths: list[int], sizes: list[int] | None = None) -> float:
        """No plan over groups of these sizes beats the larger of: the least total rank-time
        spread over the ranks, and the slowest sequence on its best group."""
        kinds = sorted(set(sizes or self.sizes))
        ranks = min(self.ranks, sum(sizes)) if sizes else self.ranks
        need = self.min_sizes(lengths)
        costs = self.step_costs(lengths)
        times = np.stack([costs.bound_times(s) for s in kinds])  # [kinds, n]
        allowed = np.array(kinds)[:, None] >= need[None, :]
        work = np.where(allowed, times * np.array(kinds)[:, None], np.inf).min(0)
        alone = np.where(allowed, times, np.inf).min(0)
        return float(max(work.sum() / ranks, alone.max(initial=0.0)))

    # ------------------------------------------------------------------ greedy

    def _assign(self, order: list[int], sizes: list[int], times: dict[int, list[float]],
                need: list[int]) -> list[list[int]]:
        """In `order` (longest first), each sequence to the group (big enough) that would finish it
        soonest; `times` and `need` as plain lists (this loop is the greedy's hot path)."""
        kinds = [(s, [(0.0, g) for g, t in enumerate(sizes) if t == s], times[s]) for s in sorted(set(sizes))]
        members: list[list[int]] = [[] for _ in sizes]
        for i in order:
            best, home = math.inf, None
            for s, heap, t in kinds:
                if s >= need[i] and heap[0][0] + t[i] < best:
                    best, home = heap[0][0] + t[i], heap
            g = home[0][1]
            heapq.heapreplace(home, (best, g))
            members[g].append(i)
        return members

    def candidate_partitions(self, need: np.ndarray) -> list[list[int]]:
        needs = sorted(need.tolist(), reverse=True)
        out = []
        for long in ([], needs):  # every static degree; then one group per long sequence, as far as ranks allow
            for base in self.sizes:
                slots = NodeSlots(self.ranks, self.cost.hw.gpus_per_node)
                sizes = [n for n in long if n > base and slots.take(n) is not None]
                sizes += [base] * slots.fill(base)
                if sizes not in out:
                    out.append(sizes)
        return [p for p in out if max(p) >= need.max(initial=1)]

    def _assigned_plan(self, lengths: list[int], sizes: list[int], times: dict[int, list[float]],
                       need: np.ndarray, solver: str) -> Plan:
        order = np.argsort(-np.asarray(lengths), kind="stable").tolist()
        members = self._assign(order, sizes, times, need.tolist())
        used = [g for g in range(len(sizes)) if members[g]]
        return self.finish(lengths, [sizes[g] for g in used], [members[g] for g in used], solver)

    def greedy(self, lengths: list[int]) -> Plan:
        need = self.min_sizes(lengths)
        times = {s: self.share_times(lengths, s).tolist() for s in self.sizes}
        candidates = sorted(((self.lower_bound(lengths, p), p) for p in self.candidate_partitions(need)),
                            key=lambda c: c[0])
        best = None
        for bound, sizes in candidates:
            if best is not None and bound >= best.predicted_s:
                break  # no remaining candidate can do better
            plan = self._assigned_plan(lengths, sizes, times, need, "greedy")
            if best is None or plan.predicted_s < best.predicted_s:
                best = plan
        return best

    def in_rounds(self, lengths: list[int]) -> Plan:
        """A grouping per round of micro-batches (see the module's docstring): each round takes the
        waiting sequences longest first — first fit (`_first_fit_round`), or in time linear in the
        sequences placed (`_fast_round`) where sequences × rounds would be many; what finds no room
        waits for the next round."""
        n = np.asarray(lengths, dtype=np.int64)
        need = self.min_sizes(lengths)
        order = np.argsort(-n, kind="stable").tolist()
        rounds = float(n.sum()) / (self.ranks * self.tokens_per_gpu)
        first_fit = len(order) * max(1.0, rounds) <= FIRST_FIT_WORK
        lengths_list, need_list = n.tolist(), need.tolist()  # (Python ints: the first-fit loop is scalar)
        waiting = (order, []) if first_fit else ([i for i in order if need[i] > 1], [i for i in order if need[i] == 1])
        groups: list[Group] = []
        total, round_ = 0.0, 0
        while waiting[0] or waiting[1]:
            if first_fit:
                opened, rest = self._first_fit_round(waiting[0], lengths_list, need_list)
                waiting = (rest, [])
            else:
                opened, waiting = self._fast_round(*waiting, n, need)
            for size, _, members, start in opened:  # (sizes non-increasing)
                groups.append(Group(start, size, [members], round_))
            total += float(self.group_times(lengths, [(g[0], [g[2]]) for g in opened]).max(initial=0.0))
            round_ += 1
        return Plan(groups, total, self.lower_bound(lengths), solver="rounds")

    def _first_fit_round(self, waiting: list[int], n: list[int], need: list[int]) -> tuple[list, list[int]]:
        """Each sequence into the first group of the round that is big enough and has room, else a
        new group of its smallest size while a node has room for it (Megatron's dynamic CP rule).
        Returns the groups as [size, room left, members, first rank] and what waits."""
        size: list[int] = []
        room: list[int] = []
        members: list[list[int]] = []
        starts: list[int] = []
        shortest = n[waiting[-1]]
        roomy: list[int] = []  # the groups, in opening order, with room for the shortest sequence
        slots, rest = NodeSlots(self.ranks, self.cost.hw.gpus_per_node), []
        for k, i in enumerate(waiting):
            length, wanted = n[i], need[i]
            g = next((g for g in roomy if size[g] >= wanted and room[g] >= length), -1)
            start = slots.take(wanted) if g < 0 else None
            if start is not None:
                g = len(size)
                size.append(wanted)
                room.append(wanted * self.tokens_per_gpu)
                members.append([])
                starts.append(start)
                roomy.append(g)
            elif g < 0:
                rest.append(i)
                if not slots.free and not roomy:  # the round is full
                    rest += waiting[k + 1:]
                    break
                continue
            room[g] -= length
            members[g].append(i)
            if room[g] < shortest:
                roomy.remove(g)
        return [[size[g], room[g], m, starts[g]] for g, m in enumerate(members)], rest

    def _fast_round(self, long: list[int], short: list[int], n: np.ndarray,
                    need: np.ndarray) -> tuple[list, tuple[list[int], list[int]]]:
        """The same in time linear in the sequences placed: those that need several ranks (`long`)
        go to the group of the smallest fitting size with the most room, else a new group; the
        one-rank ones (`short`) then fill, next fit, the room left in the round's groups and
        one-rank groups on its free ranks. Returns the groups (as `_first_fit_round` does) and what
        waits, as (long, short)."""
        cap = self.tokens_per_gpu
        slots, opened, rest = NodeSlots(self.ranks, self.cost.hw.gpus_per_node), [], []
        heaps: dict[int, list[tuple[int, int]]] = {}  # size → (−room, group) of the round's groups
        for i in long:
            home = None
            for size in sorted(heaps):
                if size >= need[i] and heaps[size] and -heaps[size][0][0] >= n[i]:
                    home = heapq.heappop(heaps[size])[1]
                    break
            start = slots.take(int(need[i])) if home is None else None
            if start is not None:
                home = len(opened)
                opened.append([int(need[i]), int(need[i]) * cap, [], start])
            if home is None:
                rest.append(i)
                continue
            opened[home][1] -= int(n[i])
            opened[home][2].append(i)
            heapq.heappush(heaps.setdefault(opened[home][0], []), (-opened[home][1], home))
        bins = len(opened) + slots.free  # the round's groups, then one-rank groups on its free ranks
        b, room = 0, opened[0][1] if opened else cap
        for k, i in enumerate(short):
            while b < bins and room < n[i]:
                b += 1
                room = opened[b][1] if b < len(opened) else cap
            if b == bins:
                return opened, (rest, short[k:])
            if b >= len(opened):
                opened.append([1, cap, [], slots.take(1)])
            opened[b][2].append(i)
            room -= int(n[i])
        return opened, (rest, [])

    def static(self, lengths: list[int], size: int) -> Plan:
        """Every group of one size (static SP of that degree), for comparison."""
        sizes = [size] * NodeSlots(self.ranks, self.cost.hw.gpus_per_node).fill(size)
        return self._assigned_plan(lengths, sizes, {size: self.share_times(lengths, size).tolist()},
                                   self.min_sizes(lengths), f"static-{size}")

    # ------------------------------------------------------------------ MILP

    def milp(self, lengths: list[int], warm: Plan | None) -> Plan | None:
        import highspy

        arr = np.asarray(lengths, dtype=np.float64)
        logs = np.log(arr)
        edges = np.linspace(logs.min(), logs.max() + 1e-9, self.buckets + 1)[1:-1]  # geometric length buckets
        which = np.searchsorted(edges, logs)
        buckets = [np.nonzero(which == b)[0] for b in range(self.buckets) if (which == b).any()]
        inst = [s for s in self.sizes for _ in range(min(self.ranks // s, len(lengths)))]
        e = self.cost.hw.microbatch_overhead_s
        work = {s: self.share_times(arr, s) - e * arr / (s * self.tokens_per_gpu) for s in set(inst)}
        seconds = [[float(work[s][b].mean()) for s in inst] for b in buckets]  # the fixed cost counts per micro-batch
        tokens = [float(arr[b].mean()) for b in buckets]
        need = [int(self.min_sizes([int(arr[b].max())])[0]) for b in buckets]
        n_seq = len(lengths)

        h = quiet_highs()
        h.setOptionValue("time_limit", float(self.time_limit_s))
        h.setOptionValue("mip_rel_gap", 1e-3)
        integer = highspy.HighsVarType.kInteger
        # y[b][g]: sequences of bucket b on group instance g; used[g]: the group exists; mbs[g]: its micro-batches
        y = [[h.addVariable(0, b.size if need[i] <= s else 0, type=integer) for s in inst]
             for i, b in enumerate(buckets)]
        used = [h.addVariable(0, 1, type=integer) for _ in inst]
        mbs = [h.addVariable(0, n_seq, type=integer) for _ in inst]
        makespan = h.addVariable(0, highspy.kHighsInf, obj=1.0)
        for i, b in enumerate(buckets):  # every sequence goes somewhere
            h.addConstr(h.qsum(y[i]) == b.size)
        for g, s in enumerate(inst):
            column = [y[i][g] for i in range(len(buckets))]
            h.addConstr(h.qsum(column) <= n_seq * used[g])  # only used groups take sequences
            h.addConstr(h.qsum(t * v for t, v in zip(tokens, column)) <= s * self.tokens_per_gpu * mbs[g])  # memory
            h.addConstr(used[g] <= mbs[g])  # a used group runs at least one micro-batch
            h.addConstr(h.qsum(seconds[i][g] * y[i][g] for i in range(len(buckets))) + e * mbs[g] <= makespan)
            if g + 1 < len(inst) and inst[g + 1] == s:
                h.addConstr(used[g] >= used[g + 1])  # symmetry: instances of a size in order
        h.addConstr(h.qsum(s * used[g] for g, s in enumerate(inst)) <= self.ranks)  # the groups fit in the ranks
        if warm is not None:
            self._warm_start(h, warm, buckets, inst, y, used, mbs, makespan)
        h.minimize()
        if h.getInfo().primal_solution_status != 2:  # no feasible solution within the time cap
            return None
        x = np.asarray(h.getSolution().col_value)
        take = [sorted(b.tolist(), key=lambda i: -lengths[i]) for b in buckets]
        sizes, members = [], []
        for g, s in enumerate(inst):
            if x[used[g].index] < 0.5:
                continue
            chosen = []
            for i in range(len(buckets)):
                n = int(round(x[y[i][g].index]))
                chosen += take[i][:n]
                take[i] = take[i][n:]
            if chosen:
                sizes.append(s)
                members.append(chosen)
        if any(take) or self.place(sorted(sizes, reverse=True)) is None:  # sequences left out, or groups across nodes
            return None
        return self.finish(lengths, sizes, members, "milp")

    @staticmethod
    def _warm_start(h, warm: Plan, buckets, inst, y, used, mbs, makespan) -> None:
        import highspy

        bucket_of = {int(i): b for b, idx in enumerate(buckets) for i in idx}
        x = np.zeros(h.numVariables)
        free = {s: [g for g, t in enumerate(inst) if t == s] for s in set(inst)}
        for group in warm.groups:
            if not free.get(group.size):
                return
            g = free[group.size].pop(0)
            x[used[g].index] = 1
            x[mbs[g].index] = len(group.microbatches)
            for mb in group.microbatches:
                for i in mb:
                    x[y[bucket_of[i]][g].index] += 1
        x[makespan.index] = warm.predicted_s * 2
        sol = highspy.HighsSolution()
        sol.col_value = x.tolist()
        sol.value_valid = True
        h.setSolution(sol)

    # ------------------------------------------------------------------ entry points

    def solve(self, lengths: list[int]) -> Plan:
        t0 = time.perf_counter()
        if self.regroup == "rounds":
            plan = self.in_rounds(lengths)
        else:
            plan = self.greedy(lengths)
            if self.use_milp and len(lengths) > 1:
                better = self.milp(lengths, plan)
                if better is not None and better.predicted_s < plan.predicted_s * (1 - 1e-9):
                    plan = better
            if self.regroup == "auto":
                rounds = self.in_rounds(lengths)
                if rounds.predicted_s < plan.predicted_s * (1 - 1e-9):
                    plan = rounds
        plan.solve_s = time.perf_counter() - t0
        return plan


def trainer_planner(cost: CostModel, ranks: int, max_group: int, tokens_per_gpu: int,
                    solver_time_s: float, regroup: str = "auto",
                    group_sizes: str = "powers_of_two") -> AdaptivePlanner:
    """The planner as the trainer runs it: greedy, then the MILP polish within `solver_time_s` (0:
    greedy only), against a grouping per round where `regroup` allows it, over groups of `group_sizes`."""
    return AdaptivePlanner(cost, ranks, max_group, tokens_per_gpu, time_limit_s=solver_time_s,
                           use_milp=solver_time_s > 0, regroup=regroup, group_sizes=group_sizes)


def quiet_highs():
    """A HiGHS model with its log off. The first one a process makes prints HiGHS's banner straight
    to file descriptor 1, before any option can be set: that descriptor points elsewhere meanwhile."""
    import highspy

    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    h.setOptionValue("output_flag", False)
    return h


def solve_or_explain(planner: AdaptivePlanner, lengths: list[int]) -> Plan | str:
    """A step's plan, or why there is none (what the trainer's solver process returns)."""
    try:
        return planner.solve(lengths)
    except SequenceTooLong as err:
        return str(err)
