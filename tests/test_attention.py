"""Attention against plain float64 math: every CPU backend, MLA absorbed vs non-absorbed, MHA, masks, names."""

import math

import pytest
import torch

from deepseek_vl2_lora.model import VL2Config
from deepseek_vl2_lora.model.attention import (
    ATTENTION_FUNCTIONS,
    MHAttention,
    MLAttention,
    build_attention_mask,
    resolve_attn_implementation,
)
from deepseek_vl2_lora.model.tiny import family_config


def reference_attention(q, k, v, attention_mask, scale):
    """softmax(q kᵀ·scale + causal + key padding) v in float64, queries aligned to the end of the keys."""
    q, k, v = q.double(), k.double(), v.double()
    s_q, s_k = q.shape[-2], k.shape[-2]
    scores = q @ k.transpose(-1, -2) * scale
    allowed = torch.ones(s_q, s_k, dtype=torch.bool).tril(s_k - s_q)
    if attention_mask is not None:
        allowed = allowed[None, None] & attention_mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~allowed, -math.inf)
    return torch.softmax(scores, -1) @ v


def _mask(kind, b, s):
    m = torch.ones(b, s, dtype=torch.long)
    if kind == "right":
        m[1, s - 3 :] = 0
    elif kind == "left":
        m[1, :3] = 0
    return m


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("dims", [(12, 12), (12, 8)], ids=["same_dv", "mla_dv"])
def test_backends_match_plain_math(backend, padding, dims):
    b, h, s = 2, 3, 9
    q, k = torch.randn(b, h, s, dims[0]), torch.randn(b, h, s, dims[0])
    v = torch.randn(b, h, s, dims[1])
    am = _mask(padding, b, s)
    out = ATTENTION_FUNCTIONS[backend](q, k, v, build_attention_mask(am, s, s), 0.3)
    ref = reference_attention(q, k, v, am, 0.3)
    real = am.bool()  # only real query rows are defined by the reference
    assert torch.allclose(out.double().transpose(1, 2)[real], ref.transpose(1, 2)[real], atol=1e-5)
    assert torch.isfinite(out).all(), "a padded row must not produce NaN"


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_decode_step_with_cache_and_left_padding(backend):
    b, h, past, d = 2, 2, 6, 8
    k, v = torch.randn(b, h, past + 1, d), torch.randn(b, h, past + 1, d)
    q = torch.randn(b, h, 1, d)
    am = _mask("left", b, past + 1)
    out = ATTENTION_FUNCTIONS[backend](q, k, v, build_attention_mask(am, 1, past + 1), 0.5)
    assert torch.allclose(out.double(), reference_attention(q, k, v, am, 0.5), atol=1e-5)


def _lang(family):
    return VL2Config.from_dict(family_config(family, 100)).language


def _init(module):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0))


@pytest.mark.parametrize("family", ["small-mla", "full-noaux"])
def test_mla_non_absorbed_equals_official_absorbed_formula(family):
    """The official eager path folds kv_b_proj into q and the output; ours decompresses K and V. Same function."""
    cfg = _lang(family)
    attn = MLAttention(cfg, "eager")
    _init(attn)
    b, s, h = 2, 7, cfg.num_attention_heads
    x = torch.randn(b, s, cfg.hidden_size)
    pos = torch.arange(s).expand(b, s)
    out, _ = attn(x, pos, None)

    # Absorbed form, written from the formulas (float64).
    d = torch.float64
    nope, rope, vd, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    xd = x.double()
    if cfg.q_lora_rank is None:
        q = xd @ attn.q_proj.weight.double().T
    else:
        qa = xd @ attn.q_a_proj.weight.double().T
        qa = qa * torch.rsqrt(qa.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * attn.q_a_layernorm.weight.double()
        q = qa @ attn.q_b_proj.weight.double().T
    q = q.view(b, s, h, nope + rope).transpose(1, 2)
    q_nope, q_pe = q[..., :nope], q[..., nope:]
    ckv = xd @ attn.kv_a_proj_with_mqa.weight.double().T
    c, k_pe = ckv[..., :r], ckv[..., r:]
    c = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * attn.kv_a_layernorm.weight.double()
    # GPT-J interleaved RoPE on the raw layout, as complex multiplication on (even, odd) pairs.
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, rope, 2, dtype=d) / rope))
    ang = torch.arange(s, dtype=d)[:, None] * inv[None]
    rot = torch.polar(torch.ones_like(ang), ang)

    def rope_pairs(t):
        tc = torch.view_as_complex(t.reshape(*t.shape[:-1], rope // 2, 2).contiguous())
        return torch.view_as_real(tc * rot).flatten(-2)

    q_pe, k_pe = rope_pairs(q_pe), rope_pairs(k_pe[:, None])
    w = attn.kv_b_proj.weight.double().view(h, nope + vd, r)
    q_absorb, out_absorb = w[:, :nope], w[:, nope:]
    q_lat = torch.einsum("bhsn,hnr->bhsr", q_nope, q_absorb)
    scores = (q_pe @ k_pe.transpose(-1, -2) + q_lat @ c[:, None].transpose(-1, -2)) * (nope + rope) ** -0.5
    scores = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), -math.inf)
    ctx = torch.softmax(scores, -1) @ c[:, None]
    o = torch.einsum("bhsr,hvr->bhsv", ctx, out_absorb).transpose(1, 2).reshape(b, s, h * vd)
    ref = o @ attn.o_proj.weight.double().T
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["small-mla", "full-noaux"])
def test_benchmark_absorbed_reference_path_is_the_same_function(family):
    attn = MLAttention(_lang(family), "eager")
    _init(attn)
    x = torch.randn(2, 7, attn.o_proj.out_features)
    pos = torch.arange(7).expand(2, 7)
    ours, _ = attn(x, pos, None)
    attn.absorbed_reference = True
    ref, _ = attn(x, pos, None)
    assert torch.allclose(ours, ref, atol=1e-5)


def test_mha_matches_llama_formula():
    cfg = _lang("tiny-mha")
    attn = MHAttention(cfg, "sdpa")
    _init(attn)
    b, s, h, hd = 2, 6, cfg.num_attention_heads, cfg.mha_head_dim
    x = torch.randn(b, s, cfg.hidden_size)
    out, _ = attn(x, torch.arange(s).expand(b, s), None)
    xd = x.double()
    q, k, v = (
        (xd @ getattr(attn, n).weight.double().T).view(b, s, h, hd).transpose(1, 2)
        for n in ("q_proj", "k_proj", "v_proj")
    )
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def neox(t):  # rotate_half over the whole head
        t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    ctx = reference_attention(neox(q), neox(k), v, None, hd**-0.5)
    ref = ctx.transpose(1, 2).reshape(b, s, h * hd) @ attn.o_proj.weight.double().T
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_yarn_softmax_scale_uses_mscale_rule():
    cfg = _lang("small-mla")
    cfg.rope_scaling = {
        "type": "yarn",
        "factor": 40.0,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
    }
    attn = MLAttention(cfg, "eager")
    m = 0.1 * 0.707 * math.log(40.0) + 1.0
    assert attn.softmax_scale == pytest.approx((16 + 8) ** -0.5 * m * m)


def test_attention_names():
    assert resolve_attn_implementation("sdpa", True) == ("mla", "sdpa")
    assert resolve_attn_implementation("flash_attention_2", False) == ("mha", "flash_attention_2")
    assert resolve_attn_implementation("mha_eager", False) == ("mha", "eager")
    with pytest.raises(ValueError, match="valid names: eager, sdpa, flash_attention_2, mla_eager"):
        resolve_attn_implementation("flash3", True)
    with pytest.raises(ValueError, match="does not fit an MHA"):
        resolve_attn_implementation("mla_eager", False)


def test_flash_needs_cuda_with_clear_error():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        ATTENTION_FUNCTIONS["flash_attention_2"](q, q, q, None, 1.0)
