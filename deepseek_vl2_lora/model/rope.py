"""Rotary position embeddings as DeepSeek-V2 uses them.

Two conventions live here:
- MLA rotates only the `qk_rope_head_dim` slice, and its checkpoint stores those dims interleaved
  (GPT-J style pairs). The official code de-interleaves (`view(d/2, 2).transpose`) and then applies
  `rotate_half`; we do the same, so q·k matches the official scores exactly.
- MHA (VL2-Tiny, Llama attention) applies NeoX `rotate_half` over the full head dim, no de-interleave.

cos/sin are computed from `position_ids` on the fly (cheap next to attention; no caches to keep in sync).
"""

from __future__ import annotations

import math
from contextlib import nullcontext as _nullcontext

import torch
from torch import nn


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _yarn_inv_freq(dim: int, base: float, scaling: dict) -> tuple[torch.Tensor, float]:
    factor = scaling["factor"]
    original_max = scaling.get("original_max_position_embeddings", 4096)
    beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    freq_extra = 1.0 / (base**exponents)
    freq_inter = 1.0 / (factor * base**exponents)
    low = max(math.floor(_yarn_correction_dim(beta_fast, dim, base, original_max)), 0)
    high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, base, original_max)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extra_mask = 1.0 - ramp
    inv_freq = freq_inter * (1 - extra_mask) + freq_extra * extra_mask
    mscale = yarn_get_mscale(factor, scaling.get("mscale", 1)) / yarn_get_mscale(
        factor, scaling.get("mscale_all_dim", 0)
    )
    return inv_freq.float(), mscale


class RotaryEmbedding(nn.Module):
    """cos/sin of shape [B, S, dim] for given positions; supports no scaling, linear, dynamic NTK and yarn."""

    def __init__(self, dim: int, base: float, max_position_embeddings: int, scaling: dict | None = None):
        super().__init__()
        self.dim, self.base, self.max_pos = dim, base, max_position_embeddings
        self.scaling = dict(scaling) if scaling else None
        kind = self.scaling.get("type", self.scaling.get("rope_type")) if self.scaling else None
        if kind not in (None, "linear", "dynamic", "yarn"):
            raise ValueError(f"rope_scaling type {kind!r}: expected linear, dynamic or yarn")
        self.kind = kind
        self.mscale = 1.0
        self.reset_inv_freq(device=None)

    def reset_inv_freq(self, device="cpu") -> None:
        """(Re)build the frequencies; `device="cpu"` rebuilds real values after a meta-device construction."""
        with torch.device(device) if device else _nullcontext():
            if self.kind == "yarn":
                inv_freq, self.mscale = _yarn_inv_freq(self.dim, self.base, self.scaling)
            else:
                exps = torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim
                inv_freq = (1.0 / self.base**exps).float()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _inv_freq_for(self, seq_len: int) -> torch.Tensor:
        if self.kind == "dynamic" and seq_len > self.max_pos:
            factor = self.scaling["factor"]
            base = self.base * ((factor * seq_len / self.max_pos) - (factor - 1)) ** (self.dim / (self.dim - 2))
            exps = torch.arange(0, self.dim, 2, dtype=torch.float64, device=self.inv_freq.device) / self.dim
            return (1.0 / base**exps).float()
        return self.inv_freq

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = position_ids.float()
        if self.kind == "linear":
            pos = pos / self.scaling["factor"]
        inv_freq = self._inv_freq_for(int(position_ids.max().item()) + 1 if self.kind == "dynamic" else 0)
        freqs = pos[..., None] * inv_freq.to(pos.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.mscale).to(dtype), (emb.sin() * self.mscale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x: [B, H, S, d]; cos/sin: [B, S, d]. `interleaved` de-interleaves pairs first (the MLA convention)."""
    if interleaved:
        b, h, s, d = x.shape
        x = x.view(b, h, s, d // 2, 2).transpose(-1, -2).reshape(b, h, s, d)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
