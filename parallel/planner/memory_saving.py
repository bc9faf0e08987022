"""How a layout makes a micro-batch fit a GPU: which blocks are recomputed in backward, whether
those keep their attention output, whether the SwiGLU runs in tiles, whether AdamW's moments live
in host memory, and whether the recomputed blocks' inputs do.

One rule serves `loom plan`'s search and the trainer's `auto` settings: for every combination of
the techniques the settings allow, the fewest recomputed blocks that fit the GPU; of the
combinations that fit the GPU and whose offloads fit the host, the fastest by the cost model (on a
tie, the one with fewer techniques on); when none fits, the one that needs the least GPU memory,
so that the caller can say what it needs.
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
    offload_moments: bool = False  # AdamW moments in host memory
    offload_inputs: bool = False  # recomputed blocks' inputs in host memory

    def applied(self, cost: CostModel) -> CostModel:
        return replace(cost, recomputed=self.recomputed / cost.shape.n_layers, keep_attention=self.keep_attention,
                       mlp_tile=self.mlp_tile, offload_optimizer=self.offload_moments,
                       offload_inputs=self.offload_inputs)

    def describe(self, n_layers: int) -> str:
        parts = [f"{self.recomputed}/{n_layers} blocks recomputed"
                 + (" (attention kept)" if self.keep_attention and self.recomputed else "")]
        if self.mlp_tile:
            parts.append(f"SwiGLU in tiles of {self.mlp_tile:,} tokens")
        if self.offload_inputs and self.recomputed:
            parts.append("their inputs in host memory")
        if self.offload_moments:
            parts.append("AdamW moments in host memory")
        return ", ".join(parts)


Combo = tuple[bool, int, bool, bool]  # keep_attention, mlp_tile, offload_moments, offload_inputs


def options(keep_attention: bool | None, mlp_tile: int | None, keep_allowed: bool,
            tokens_per_gpu: float, offload_moments: bool | None = False,
            offload_inputs: bool | None = False) -> list[Combo]:
    """Combinations to weigh: a setting given is kept; `None` (auto) tries keeping the attention
    where the layout allows it, tiles of MLP_TILE above that many tokens, and moments and inputs on
    the GPU and on the host."""
    keeps = [keep_attention] if keep_attention is not None else ([False, True] if keep_allowed else [False])
    tiles = [mlp_tile] if mlp_tile is not None else ([0, MLP_TILE] if tokens_per_gpu > MLP_TILE else [0])
    moments = [offload_moments] if offload_moments is not None else [False, True]
    inputs = [offload_inputs] if offload_inputs is not None else [False, True]
    return [(k, t, m, i) for k in keeps for t in tiles for m in moments for i in inputs]


def choose(n_layers: int, combos: list[Combo], blocks: int | None,
           need: Callable[[MemorySaving], float], limit: float,
           host_need: Callable[[MemorySaving], float], host_limit: float,
           seconds: Callable[[MemorySaving], float]) -> MemorySaving:
    """The setting by the module's rule. `blocks` fixes the recomputed count (None: the fewest that
    fit); `need` is a setting's GPU memory, compared with `limit`, and `host_need` the host memory
    its offloads fill, compared with `host_limit`; `seconds` its time per step."""
    ranked = []
    for keep, tile, moments, inputs in combos:
        base = MemorySaving(0, keep, tile, moments, inputs)
        count = blocks if blocks is not None else fewest_blocks(
            n_layers, lambda k, base=base: need(replace(base, recomputed=k)) <= limit)
        setting = replace(base, recomputed=count)
        needed = need(setting)
        fits = needed <= limit and host_need(setting) <= host_limit
        ranked.append((not fits, seconds(setting) if fits else needed, keep + bool(tile) + moments + inputs, setting))
    return min(ranked, key=lambda r: r[:3])[3]
