"""Point-to-point exchanges of a ring hop: batched async send/recv, one process group per direction.

Every op is counted (`COMM_STATS`: ops and bytes per kind), so tests can check what crosses the
wire — e.g. that GQA sends K/V heads only — and benchmarks can report bytes per step.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

COMM_STATS: Counter = Counter()
_OVERLAP = [True]


def set_overlap(enabled: bool) -> None:
    """False makes every exchange complete as soon as it is posted, so no hop's transfer hides
    behind compute (the baseline that shows what overlap is worth)."""
    _OVERLAP[0] = enabled


@dataclass
class Exchange:
    """The sends and receives of one hop; `start()` posts them all, `wait()` completes them."""

    group: dist.ProcessGroup
    reverse_group: dist.ProcessGroup
    ops: list[dist.P2POp] = field(default_factory=list)
    works: list = field(default_factory=list)

    def _peer(self, group_rank: int, step: int) -> tuple[int, dist.ProcessGroup]:
        group = self.group if step > 0 else self.reverse_group
        return dist.get_global_rank(group, group_rank), group

    def send(self, tensor: torch.Tensor, to: int, step: int, kind: str) -> None:
        if tensor.numel() == 0:
            return
        peer, group = self._peer(to, step)
        self.ops.append(dist.P2POp(dist.isend, tensor.contiguous(), peer, group))
        COMM_STATS[f"{kind}_ops"] += 1
        COMM_STATS[f"{kind}_bytes"] += tensor.numel() * tensor.element_size()

    def recv(self, tensor: torch.Tensor, frm: int, step: int) -> torch.Tensor:
        if tensor.numel():
            peer, group = self._peer(frm, step)
            self.ops.append(dist.P2POp(dist.irecv, tensor, peer, group))
        return tensor

    def start(self) -> "Exchange":
        for group in {id(op.group): op.group for op in self.ops}.values():  # one batch per communicator
            self.works += dist.batch_isend_irecv([op for op in self.ops if op.group is group])
        if not _OVERLAP[0]:
            self.wait()
        return self

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works, self.ops = [], []
