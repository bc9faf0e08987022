"""A parallel layout as plain degrees — pp × dp × sp (ring × Ulysses) × tp — and their arithmetic.

Decided and checked once, when a job is resolved (`trainer.job`); each worker builds its mesh
from it (`parallel.mesh`). Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from parallel.choices import SPMethod


@dataclass(frozen=True)
class Layout:
    dp: int
    pp: int = 1
    tp: int = 1
    ring: int = 1
    ulysses: int = 1
    sp_method: SPMethod = "ring"
    adaptive: bool = False  # sp.mode=adaptive: every step regroups all dp × sp ranks into groups of ≤ sp ranks
    pp_virtual: int = 1  # pipeline stages per pp rank

    @property
    def sp(self) -> int:
        return self.ring * self.ulysses

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.sp * self.tp

    @property
    def stages(self) -> int:
        return self.pp * self.pp_virtual

    def describe(self) -> str:
        if self.adaptive:
            return f"adaptive SP over {self.dp * self.sp} ranks (groups of 1–{self.sp}, {self.sp_method})"
        sp = f"sp={self.sp} ({self.sp_method}" + (f", ring {self.ring} × ulysses {self.ulysses})"
                                                  if self.sp_method == "hybrid" else ")")
        return " × ".join(p for p in (f"dp={self.dp}", f"tp={self.tp}" if self.tp > 1 else "",
                                      f"pp={self.pp}" if self.pp > 1 else "", sp if self.sp > 1 else "") if p)


def largest_ulysses(degree: int, n_heads: int, n_kv_heads: int, tp: int) -> int:
    """The largest Ulysses size < degree that divides it and fits the heads (1 if none)."""
    for u in range(degree - 1, 1, -1):
        if degree % u == 0 and n_heads % (u * tp) == 0 and (n_kv_heads % u == 0 or u % n_kv_heads == 0):
            return u
    return 1


def ring_and_ulysses(method: SPMethod, degree: int, ulysses: int) -> tuple[int, int]:
    """(ring size R, Ulysses size U) of an SP group of `degree` ranks."""
    if method in ("ring", "ring_bidir", "allgather"):
        return degree, 1
    if method == "ulysses":
        return 1, degree
    if ulysses < 1 or degree % ulysses:
        raise ValueError(f"sp.ulysses={ulysses} does not divide sp.degree={degree}")
    return degree // ulysses, ulysses
