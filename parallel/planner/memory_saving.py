"""How a layout makes a micro-batch fit a GPU: which blocks are recomputed in backward, whether
those keep their attention output, whether the SwiGLU runs in tiles, and whether AdamW's moments
live in host memory.

One rule serves `loom plan`'s search and the trainer's `auto` settings: for every combination of
the techniques the settings allow, the fewest recomputed blocks that fit memory; of the
combinations that fit, the fastest by the cost model (on a tie, the one with fewer techniques on);
when none fits, the one that needs the least memory, so that the caller can say what it needs.
Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from parallel.planner.cost_model import CostModel
from parallel.planner.shape import fewest_blocks

MLP_TILE = 16384  # tokens per SwiGLU tile where `auto` tiles: when a rank holds more tokens than this


@dataclass(frozen=True)
class MemorySaving:
    recomputed: int = 0  # blocks whose activations are recomputed in backward
    keep_attention: bool = False  # recomputed blocks keep their attention output
    mlp_tile: int = 0  # tokens per SwiGLU tile (0: untiled)
    offload: bool = False  # AdamW moments in host memory

    def applied(self, cost: CostModel) -> CostModel:
        return replace(cost, recomputed=self.recomputed / cost.shape.n_layers, keep_attention=self.keep_attention,
                       mlp_tile=self.mlp_tile, offload_optimizer=self.offload)

    def describe(self, n_layers: int) -> str:
        parts = [f"{self.recomputed}/{n_layers} blocks recomputed"
                 + (" (attention kept)" if self.keep_attention and self.recomputed else "")]
        if self.mlp_tile:
            parts.append(f"SwiGLU in tiles of {self.mlp_tile:,} tokens")
        if self.offload:
            parts.append("AdamW moments in host memory")
        return ", ".join(parts)


def options(keep_attention: bool | None, mlp_tile: int | None, keep_allowed: bool,
            tokens_per_gpu: float, offload: bool | None = False) -> list[tuple[bool, int, bool]]:
    """(keep_attention, mlp_tile, offload) combinations to weigh: a setting given is kept; `None`
    (auto) tries keeping the attention where the layout allows it, tiles of MLP_TILE above that many
    tokens, and moments on the GPU and on the host."""
    keeps = [keep_attention] if keep_attention is not None else ([False, True] if keep_allowed else [False])
    tiles = [mlp_tile] if mlp_tile is not None else ([0, MLP_TILE] if tokens_per_gpu > MLP_TILE else [0])
    offloads = [offload] if offload is not None else [False, True]
    return [(k, t, o) for k in keeps for t in tiles for o in offloads]


def choose(n_layers: int, combos: list[tuple[bool, int, bool]], blocks: int | None,
           need: Callable[[MemorySaving], float], limit: float,
           seconds: Callable[[MemorySaving], float]) -> MemorySaving:
    """The setting by the module's rule. `blocks` fixes the recomputed count (None: the fewest that
    fit); `need` is a setting's memory, compared with `limit`; `seconds` its time per step."""
    ranked = []
    for keep, tile, offload in combos:
        base = MemorySaving(0, keep, tile, offload)
        count = blocks if blocks is not None else fewest_blocks(
            n_layers, lambda k, base=base: need(replace(base, recomputed=k)) <= limit)
        setting = replace(base, recomputed=count)
        needed = need(setting)
        fits = needed <= limit
        ranked.append((not fits, seconds(setting) if fits else needed, keep + bool(tile) + offload, setting))
    return min(ranked, key=lambda r: r[:3])[3]
