"""Llama-style decoder over a packed token stream: RMSNorm, RoPE, GQA attention, SwiGLU, and
optionally linear-attention layers (a hybrid model, `layer_pattern` such as "LLLS"). The
variants of the families Loom imports are options: q/k/v biases (Qwen2), q/k RMSNorm and a head
size of its own (Qwen3), a sliding window (Mistral), RoPE scaling (`trainer.rope`).

The model sees one micro-batch as a flat stream of T tokens holding several documents. It
never builds masks itself: token mixing comes in per micro-batch as `Mixers` — a softmax
`attend(q, k, v)` (local, ring, Ulysses …) and a linear `attend(q, k, v, log_decay)` (local,
LASP-2 …) — which keep documents apart. RoPE (softmax layers) uses the per-document positions of
the batch, so every document starts at position 0; linear layers mark order by their decay.
Parameter names and the RoPE convention are those of Hugging Face's Llama (`trainer.hf`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from parallel.linear_attention import FEATURE_MAPS, decay_rates
from trainer.config import ModelConfig
from trainer.loss import LogitGrads, linear_cross_entropy, logit_grads
from trainer.rope import RotaryEmbedding, apply_rope

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LinearAttend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Mixers:
    """How tokens of one micro-batch mix: softmax attention, and linear attention if the model has it."""

    softmax: Attend
    linear: LinearAttend | None = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None

    def project(self, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v [T, heads, head_dim] with RoPE applied (one compiled region: trainer/compiled.py)."""
        t = x.shape[0]
        q = self.wq(x).view(t, -1, self.head_dim)
        k = self.wk(x).view(t, -1, self.head_dim)
        v = self.wv(x).view(t, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin).contiguous(), apply_rope(k, cos, sin).contiguous(), v.contiguous()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mixers: Mixers) -> torch.Tensor:
        out = mixers.softmax(*self.project(x, cos, sin))
        return self.wo(out.reshape(x.shape[0], -1))


class LinearAttention(nn.Module):
    """Causal linear attention with per-head decay (feature map on q and k, RMS-normalised heads)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.head_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        self.feature_map = FEATURE_MAPS[cfg.linear_feature_map]
        self.register_buffer("log_decay", decay_rates(cfg.n_kv_heads, cfg.linear_decay), persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mixers: Mixers) -> torch.Tensor:
        t = x.shape[0]
        q = self.feature_map(self.wq(x).view(t, -1, self.head_dim)) * self.head_dim ** -0.5
        k = self.feature_map(self.wk(x).view(t, -1, self.head_dim))
        v = self.wv(x).view(t, -1, self.head_dim)
        out = mixers.linear(q.contiguous(), k.contiguous(), v.contiguous(), self.log_decay)
        return self.wo(self.head_norm(out).reshape(t, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def tiled(ffn: nn.Module, x: torch.Tensor, tile: int) -> torch.Tensor:
    """`ffn(x)` for a token-wise `ffn`, `tile` tokens at a time, each tile recomputed in backward: of
    its activations only the input is kept, and its hidden ones exist for one tile at a time."""
    if tile <= 0 or x.shape[0] <= tile:
        return ffn(x)
    if isinstance(x, DTensor):  # tp's sequence-parallel activations: tiles of this rank's tokens (ffn gathers each)
        x = x.to_local()
    return torch.cat([checkpoint(ffn, part, use_reentrant=False, preserve_rng_state=False) for part in x.split(tile)])


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str = "S"):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg) if kind == "S" else LinearAttention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)
        self.mlp_tile = 0  # tokens per SwiGLU tile (0: untiled); set by the trainer

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mixers: Mixers) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mixers)
        return x + tiled(self.feed_forward, self.ffn_norm(x), self.mlp_tile)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        # a dict keyed by layer index, so a pipeline stage keeps its layers' names when it drops the rest
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, kind) for i, kind in enumerate(cfg.layer_kinds())})
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.logit_grads: LogitGrads = logit_grads  # the loss's element-wise part (compiled on GPU)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.cfg.init_std
        depth_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():  # (full model only: init happens before any split)
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.ndim == 1:  # norms
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, depth_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mixers: Mixers | Attend,
                labels: torch.Tensor | None = None, loss_chunk: int = 0) -> torch.Tensor:
        """Logits [T, vocab] for a packed stream of T tokens (a bare callable: softmax attention only);
        with `labels`, the summed cross-entropy instead, computed `loss_chunk` tokens at a time
        without ever holding all logits (trainer/loss.py). A pipeline stage without the embedding takes hidden states
        instead of tokens, and one without the output layer returns hidden states."""
        if not isinstance(mixers, Mixers):
            mixers = Mixers(mixers)
        cos, sin = self.rope(positions)
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, cos, sin, mixers)
        if self.output is None:
            return h
        h = self.norm(h)
        if labels is None:
            return self.output(h)
        return linear_cross_entropy(h, self.output.weight, labels, loss_chunk or h.shape[0], self.logit_grads)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
