"""Attention for the DeepSeek-V2 decoder: MLA (small/full) and Llama-style MHA (tiny), three backends.

MLA runs in the non-absorbed form: K and V are decompressed through `kv_b_proj` (the module is called, so an
adapter on it is used), Q/K are `[nope | rope]` with width `qk_nope + qk_rope` (192) and V has `v_head_dim`
(128). That is the same function as the official absorbed eager path (tests check it) and is the cheaper form
for training.

Backends (names as in the official `ATTENTION_CLASSES`, plus sdpa):
- eager: plain matmul + fp32 softmax, the readable reference;
- sdpa: `F.scaled_dot_product_attention`, PyTorch picks the kernel;
- flash_attention_2: the `flash-attn` package when installed, else SDPA restricted to its flash/cuDNN kernels
  (cuDNN takes MLA's 192/128 natively; flash needs V padded to 192). CUDA only.

Packed rows (several samples per row, `SegmentMask`): eager uses the block-diagonal causal mask; sdpa and flash
run each sample as plain causal attention (flash-attn's varlen kernel, or one SDPA call per sample), so no
[L, L] mask is built and the fused kernels stay usable.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import LanguageConfig
from .norm import RMSNorm
from .rope import RotaryEmbedding, apply_rope, yarn_get_mscale

BACKENDS = ("eager", "sdpa", "flash_attention_2")
ATTENTION_NAMES = tuple(f"{p}_{b}" for p in ("mla", "mha") for b in BACKENDS)


def resolve_attn_implementation(name: str, use_mla: bool) -> tuple[str, str]:
    """`eager` / `sdpa` / `flash_attention_2`, or the prefixed official names -> (prefix, backend)."""
    prefix = "mla" if use_mla else "mha"
    valid = BACKENDS + ATTENTION_NAMES
    if name not in valid:
        raise ValueError(f"unknown attn_implementation {name!r}; valid names: {', '.join(valid)}")
    if name in BACKENDS:
        return prefix, name
    given, backend = name.split("_", 1)
    if given != prefix:
        kind = "an MLA (use_mla: true)" if use_mla else "an MHA (use_mla: false, like VL2-Tiny)"
        raise ValueError(
            f"attn_implementation {name!r} does not fit {kind} checkpoint; use {prefix}_{backend} or {backend}"
        )
    return prefix, backend


# --------------------------------------------------------------------------------------------- masks
def build_attention_mask(attention_mask: torch.Tensor | None, q_len: int, k_len: int) -> torch.Tensor | None:
    """Boolean mask [B, 1, Q, K] (True = attend) or None when plain causal attention is exact.

    None is returned when there is no padding, or only right padding with no cache: a real token then only
    sees earlier real tokens under the causal rule, so the mask changes nothing for real tokens (pad
    positions' outputs are never used). Every query may attend to its own key, so a left-pad row is never
    fully masked (that would give NaN).
    """
    if attention_mask is not None:
        attention_mask = attention_mask.bool()
    no_padding = attention_mask is None or bool(attention_mask.all())
    if q_len == k_len and (no_padding or bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())):
        return None
    if q_len == 1 and no_padding:
        return None
    device = attention_mask.device if attention_mask is not None else None
    q_pos = torch.arange(k_len - q_len, k_len, device=device)
    k_pos = torch.arange(k_len, device=device)
    allowed = k_pos[None, :] <= q_pos[:, None]  # [Q, K]
    if attention_mask is None:
        return allowed[None, None]
    keys = attention_mask[:, None, None, :k_len]  # [B, 1, 1, K]
    self_key = k_pos[None, :] == q_pos[:, None]
    return allowed[None, None] & (keys | self_key[None, None])


@dataclass
class SegmentMask:
    """Packed rows: `segment_ids [B, L]` numbers the samples of each row 1, 2, ... (0 = padding); every token
    attends causally to its own sample only. Each id must form one contiguous run."""

    segment_ids: torch.Tensor
    _spans: list | None = field(default=None, repr=False)
    _dense: torch.Tensor | None = field(default=None, repr=False)

    @property
    def spans(self) -> list[list[tuple[int, int]]]:
        """Per row, the (start, end) of each run of equal ids, padding runs included (host lists, one sync)."""
        if self._spans is None:
            seg = self.segment_ids.cpu()
            change = segment_starts(seg)
            length = seg.shape[1]
            self._spans = []
            for b in range(seg.shape[0]):
                starts = torch.nonzero(change[b]).flatten().tolist()
                self._spans.append(list(zip(starts, starts[1:] + [length])))
                ids = seg[b, starts].tolist()
                real = [i for i in ids if i != 0]
                if len(set(real)) != len(real):
                    raise ValueError(f"segment_ids row {b}: a sample's tokens are not contiguous ({ids})")
        return self._spans

    def dense(self) -> torch.Tensor:
        """Bool [B, 1, L, L] (True = attend): same segment and causal. Padding attends to padding, never NaN."""
        if self._dense is None:
            seg = self.segment_ids
            length = seg.shape[1]
            causal = torch.ones(length, length, dtype=torch.bool, device=seg.device).tril()
            self._dense = ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]
        return self._dense


def segment_starts(segment_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, L]: True where a run of equal segment ids begins (always at position 0)."""
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at the start of every run of equal segment ids (no host sync)."""
    idx = torch.arange(segment_ids.shape[1], device=segment_ids.device).expand_as(segment_ids)
    return idx - torch.where(segment_starts(segment_ids), idx, 0).cummax(dim=1).values


def _dense_mask(mask):
    return mask.dense() if isinstance(mask, SegmentMask) else mask


# ------------------------------------------------------------------------------------------ backends
def eager_attention(q, k, v, mask, scale):
    mask = _dense_mask(mask)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    q_len, k_len = q.shape[-2], k.shape[-2]
    if mask is None and q_len > 1:
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)
    return torch.matmul(probs, v)


def sdpa_attention(q, k, v, mask, scale):
    if isinstance(mask, SegmentMask):  # one plain causal call per sample: PyTorch keeps its fused kernels
        return per_sample_attention(q, k, v, mask, scale, attend=_causal_sdpa)
    causal = mask is None and q.shape[-2] > 1
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _causal_sdpa(q, k, v, causal, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
_warned_flash_mask = False


def flash_attention(q, k, v, mask, scale):
    global _warned_flash_mask
    if not q.is_cuda:
        raise RuntimeError(
            "flash_attention_2 needs a CUDA GPU (flash-attn or SDPA flash/cuDNN kernels); "
            "use attn_implementation=sdpa or eager on this machine"
        )
    if isinstance(mask, SegmentMask):
        return per_sample_attention(q, k, v, mask, scale)
    if mask is not None:
        # Flash kernels take no arbitrary mask; left padding or a padded cache needs one. Fall back to SDPA.
        if not _warned_flash_mask:
            warnings.warn("flash_attention_2: padding mask present, using SDPA with the mask", stacklevel=2)
            _warned_flash_mask = True
        return sdpa_attention(q, k, v, mask, scale)
    causal = q.shape[-2] > 1
    dv = v.shape[-1]
    if _HAS_FLASH_ATTN:
        from flash_attn import flash_attn_func

        vp = F.pad(v, (0, q.shape[-1] - dv)) if dv != q.shape[-1] else v
        out = flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), vp.transpose(1, 2), softmax_scale=scale, causal=causal
        )
        return out.transpose(1, 2)[..., :dv]
    return _fused_sdpa(q, k, v, causal, scale)


@torch.compiler.disable  # the kernel fallback below is a try/except on a runtime error: keep it eager
def _fused_sdpa(q, k, v, causal, scale):
    """SDPA restricted to the fused kernels: cuDNN (takes d_qk != d_v), else flash with V padded."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dv = v.shape[-1]
    try:  # cuDNN handles d_qk=192, d_v=128 on Hopper without padding
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    except RuntimeError:
        if dv == q.shape[-1]:
            raise
    vp = F.pad(v, (0, q.shape[-1] - dv))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(q, k, vp, is_causal=causal, scale=scale)[..., :dv]


@torch.compiler.disable  # the per-sample spans are host data: keep them out of compiled graphs
def per_sample_attention(q, k, v, segments: SegmentMask, scale, attend=None):
    """Per-sample causal attention over packed rows on the fused kernels, no [L, L] mask.

    With flash-attn: one varlen call over all rows (cu_seqlens from the spans). Otherwise one call of
    `attend(q, k, v, causal, scale)` per span (default: the fused SDPA kernels); a padding span attends within
    itself, its outputs are never used."""
    b, h, length, dq = q.shape
    dv = v.shape[-1]
    spans = segments.spans
    if _HAS_FLASH_ATTN and attend is None:
        from flash_attn import flash_attn_varlen_func

        lens = [e - s0 for row in spans for s0, e in row]
        cu = torch.tensor([0] + lens, device=q.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        vp = F.pad(v, (0, dq - dv)) if dv != dq else v
        flat = [t.transpose(1, 2).reshape(b * length, t.shape[1], t.shape[-1]) for t in (q, k, vp)]
        out = flash_attn_varlen_func(*flat, cu, cu, max(lens), max(lens), softmax_scale=scale, causal=True)
        return out.view(b, length, h, dq)[..., :dv].transpose(1, 2)
    attend = attend or _fused_sdpa
    rows = []
    for r, row in enumerate(spans):
        parts = [
            attend(q[r : r + 1, :, s0:e], k[r : r + 1, :, s0:e], v[r : r + 1, :, s0:e], True, scale) for s0, e in row
        ]
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0)


ATTENTION_FUNCTIONS = {"eager": eager_attention, "sdpa": sdpa_attention, "flash_attention_2": flash_attention}


# ------------------------------------------------------------------------------------------- modules
class _Attention(nn.Module):
    """What MLA and MHA share: `_heads` computes the heads' outputs and the layer's (K, V); o_proj follows."""

    def forward(self, x, position_ids, mask, past_kv=None, project: bool = True):
        """-> (o_proj(heads' outputs), the layer's (K, V)); `project=False`: the heads' outputs [B, S, H·head_dim
        of V] before o_proj (selective recompute ends there)."""
        out, kv = self._heads(x, position_ids, mask, past_kv)
        return (self.o_proj(out) if project else out), kv


class MLAttention(_Attention):
    """Multi-head latent attention (DeepSeek-V2), non-absorbed; parameter names as in the checkpoint."""

    def __init__(self, cfg: LanguageConfig, backend: str):
        super().__init__()
        d, h = cfg.hidden_size, cfg.num_attention_heads
        self.num_heads, self.backend = h, backend
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        q_dim = h * cfg.q_head_dim
        self.q_lora_rank = cfg.q_lora_rank
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, q_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)  # official: default eps, not rms_norm_eps
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, q_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)  # (same)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * cfg.v_head_dim, d, bias=cfg.attention_bias)
        self.rotary = RotaryEmbedding(
            cfg.qk_rope_head_dim, cfg.rope_theta, cfg.max_position_embeddings, cfg.rope_scaling
        )
        self.softmax_scale = cfg.q_head_dim**-0.5
        if cfg.rope_scaling and cfg.rope_scaling.get("mscale_all_dim", 0):
            m = yarn_get_mscale(cfg.rope_scaling["factor"], cfg.rope_scaling["mscale_all_dim"])
            self.softmax_scale *= m * m

        # The official eager form (scores over the latent, kv_b_proj folded in). Only the benchmark's
        # "official-style" reference path sets this: it reads kv_b_proj.weight directly, so an adapter on
        # kv_b_proj would be bypassed, and it keeps no cache.
        self.absorbed_reference = False

    def _heads(self, x, position_ids, mask, past_kv):
        b, s, _ = x.shape
        h = self.num_heads
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, h, self.nope + self.rope_dim).transpose(1, 2)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        cos, sin = self.rotary(position_ids, x.dtype)
        q_pe = apply_rope(q_pe, cos, sin, interleaved=True)
        k_pe = apply_rope(k_pe.view(b, s, 1, self.rope_dim).transpose(1, 2), cos, sin, interleaved=True)
        if self.absorbed_reference:
            return self._absorbed(q_nope, q_pe, self.kv_a_layernorm(c_kv), k_pe, _dense_mask(mask)), None
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(b, s, h, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(b, h, s, self.rope_dim)], dim=-1)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        out = ATTENTION_FUNCTIONS[self.backend](q, k, v.contiguous(), mask, self.softmax_scale)
        return out.transpose(1, 2).reshape(b, s, h * self.v_dim), (k, v)

    def _absorbed(self, q_nope, q_pe, c, k_pe, mask):
        """Official eager MLA: q_nope·W_uk against the latent, fp32 softmax over [B, H, S, S], then W_uv."""
        b, h, s, _ = q_nope.shape
        w = self.kv_b_proj.weight.view(h, self.nope + self.v_dim, self.kv_lora_rank)
        q_lat = torch.einsum("bhsn,hnr->bhsr", q_nope, w[:, : self.nope])
        scores = (q_pe @ k_pe.transpose(-1, -2) + q_lat @ c[:, None].transpose(-1, -2)) * self.softmax_scale
        if mask is None:
            mask = torch.ones(s, s, dtype=torch.bool, device=c.device).tril()
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(c.dtype)
        out = torch.einsum("bhsr,hvr->bhsv", probs @ c[:, None], w[:, self.nope :])
        return out.transpose(1, 2).reshape(b, s, h * self.v_dim)


class MHAttention(_Attention):
    """Llama-style attention (VL2-Tiny): q/k/v/o, NeoX rotate-half RoPE over the whole head."""

    def __init__(self, cfg: LanguageConfig, backend: str):
        super().__init__()
        d, h = cfg.hidden_size, cfg.num_attention_heads
        self.num_heads, self.backend = h, backend
        self.num_kv_heads = cfg.num_key_value_heads or h
        self.head_dim = cfg.mha_head_dim
        self.q_proj = nn.Linear(d, h * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * self.head_dim, d, bias=cfg.attention_bias)
        self.rotary = RotaryEmbedding(self.head_dim, cfg.rope_theta, cfg.max_position_embeddings, cfg.rope_scaling)
        self.softmax_scale = self.head_dim**-0.5

    def _heads(self, x, position_ids, mask, past_kv):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary(position_ids, x.dtype)
        q, k = apply_rope(q, cos, sin, interleaved=False), apply_rope(k, cos, sin, interleaved=False)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        rep = self.num_heads // self.num_kv_heads
        kk = k.repeat_interleave(rep, dim=1) if rep > 1 else k
        vv = v.repeat_interleave(rep, dim=1) if rep > 1 else v
        out = ATTENTION_FUNCTIONS[self.backend](q, kk, vv, mask, self.softmax_scale)
        return out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim), (k, v)
