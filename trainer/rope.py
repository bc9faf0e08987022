"""Rotary position embeddings: the frequencies of each scaling type, as Hugging Face defines them.

`model.rope_scaling` takes Hugging Face's keys (`rope_type` or `type`: `linear`, `llama3`, `yarn`;
`factor`, `original_max_position_embeddings`, …), so a model imported with `model.init_from`
keeps its own and a context extension states a new one the same way. The rotation is Hugging
Face's too — each head's first half rotated against its second (`rotate_half`) — so weights
move between the two formats unchanged. Angles are computed in fp32; yarn's attention factor
scales cos and sin.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

def scaling_type(scaling: dict[str, Any]) -> str:
    """'default' for no scaling, else the type a scaling dict names."""
    return str(scaling.get("rope_type") or scaling.get("type") or "default") if scaling else "default"


def frequencies(head_dim: int, theta: float, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """(inverse frequency of each rotated pair [head_dim / 2], attention factor)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim))
    kind = scaling_type(scaling)
    if kind == "default":
        return inv_freq, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor, 1.0
    original = float(scaling["original_max_position_embeddings"])
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / high) * ~(wavelen > original / low)
        return torch.where(medium, smoothed, scaled), 1.0
    return _yarn(head_dim, theta, factor, original, scaling)


def _yarn(head_dim: int, theta: float, factor: float, original: float,
          scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    fast, slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = correction_dim(fast), correction_dim(slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).to(torch.float32) / head_dim)
    keep = 1 - ramp  # 1: extrapolate (high frequencies kept), 0: interpolate (divided by factor)
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep, float(attention)


class RotaryEmbedding(nn.Module):
    """cos, sin [T, head_dim / 2] (fp32) for token positions, with the model's scaling."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any]):
        super().__init__()
        inv_freq, self.attention_factor = frequencies(head_dim, theta, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates each head's first half against its second, x [T, H, D], by the positions' angles (fp32)."""
    xf = x.float()
    a, b = xf.chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1).type_as(x)
