"""The model as the cost model sees it — its shape — and the parameter and FLOP counts that follow.

One implementation of each count, shared by `loom plan`, the trainer's choice of recomputed
blocks, the MFU it logs and the benchmarks. Conventions:

- *model FLOPs* (what MFU counts): forward + backward without recompute — 6 per matmul parameter
  per token (every projection, SwiGLU and the output layer) plus causal attention's scores and
  values, 2 matmuls × 2 FLOPs × head_dim × heads per visible (query, key) pair, × 3 for backward;
- *kernel FLOPs* of attention (what the time model divides by the attention rate): the same pairs
  × 3.5, since a flash-style backward recomputes the scores.

A causal document of L tokens has L(L+1)/2 visible pairs, fewer under a sliding window.
Torch-free, like the whole planner package.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

BACKWARD_MODEL = 3.0  # forward + backward of a matmul, in forwards
BACKWARD_KERNEL = 3.5  # forward + backward of a flash attention kernel (scores recomputed), in forwards


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    softmax_layers: int  # layers with softmax attention (the rest are linear attention)
    window: int = 0  # sliding-window span; 0 = full causal
    tie_embeddings: bool = False

    def matmul_params_per_layer(self) -> int:
        """q, k, v, o projections and SwiGLU's three matrices."""
        return self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads) + 3 * self.dim * self.hidden_dim

    def matmul_params(self) -> int:
        """Parameters a token is multiplied by: every layer's matrices and the output layer."""
        return self.n_layers * self.matmul_params_per_layer() + self.dim * self.vocab_size

    def params(self) -> int:
        """All parameters: the matrices, the norms and the embedding (shared with the output when tied)."""
        embedding = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.matmul_params() + embedding + (2 * self.n_layers + 1) * self.dim

    def attention_pairs(self, lengths) -> np.ndarray:
        """Visible (query, key) pairs of causal documents of these lengths (int or array)."""
        n = np.asarray(lengths, dtype=np.float64)
        pairs = n * (n + 1) / 2
        if self.window:
            w = float(self.window)
            pairs = np.where(n > w, w * (w + 1) / 2 + (n - w) * w, pairs)
        return pairs

    def _attention_flops(self, lengths, passes: float) -> np.ndarray:
        return passes * 4 * self.n_heads * self.head_dim * self.softmax_layers * self.attention_pairs(lengths)

    def attention_kernel_flops(self, lengths) -> np.ndarray:
        """FLOPs of the attention kernels over documents of these lengths, all layers, fwd + bwd."""
        return self._attention_flops(lengths, BACKWARD_KERNEL)

    def model_flops(self, lengths) -> float:
        """Model FLOPs (no recompute) of forward + backward over documents of these lengths."""
        tokens = float(np.sum(np.asarray(lengths, dtype=np.float64)))
        attention = float(np.sum(self._attention_flops(lengths, BACKWARD_MODEL)))
        return 2 * BACKWARD_MODEL * self.matmul_params() * tokens + attention

    def linear_flops_per_token(self, recomputed: float = 0.0) -> float:
        """Matmul FLOPs per token, fwd + bwd, with a fraction `recomputed` of the blocks run forward
        a second time before their backward."""
        per_layer = self.matmul_params_per_layer()
        return 2 * BACKWARD_MODEL * self.matmul_params() + 2.0 * recomputed * self.n_layers * per_layer

    def shard(self, tp: int = 1, pp: int = 1) -> "ModelShape":
        """What one rank of a tp × pp layout holds: its heads, its SwiGLU columns, its stage's layers."""
        layers = max(1, self.n_layers // pp)
        return replace(self, n_heads=self.n_heads // tp, n_kv_heads=max(1, self.n_kv_heads // tp),
                       hidden_dim=self.hidden_dim // tp, vocab_size=max(1, self.vocab_size // tp), n_layers=layers,
                       softmax_layers=self.softmax_layers * layers // self.n_layers)


def recomputed_block_ids(count: int, n_layers: int) -> set[int]:
    """Indices of `count` of the model's `n_layers` blocks, spread evenly: the blocks whose
    activations are recomputed in backward."""
    return {j * n_layers // count for j in range(count)} if count > 0 else set()


def fewest_blocks(n_layers: int, fits) -> int:
    """The fewest recomputed blocks k in 0..n_layers with `fits(k)`; n_layers when none fits.
    Memory does not grow with k (each recomputed block holds less until its backward, and the
    last block, whose backward comes first, is the last to be recomputed), so bisection."""
    lo, hi = 0, n_layers
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
