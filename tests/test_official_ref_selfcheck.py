"""Self-checks of the independent official reference (tests/official_ref) against hand-computable facts.

These test the yardstick itself, not ``deepseek_vl2_lora``.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from official_ref.batch import image_grid_size, make_official_batch, num_image_tokens
from official_ref.checkpoint import FAMILIES, sparse_config, write_official_checkpoint
from official_ref.forward import (
    causal_padding_mask,
    densify_config,
    load_official_config,
    load_official_state_dict,
    mla_softmax_scale,
    official_downsample_unfold,
    official_format_image,
    official_forward,
    official_gate,
    official_mla_absorbed,
    official_projector,
    official_rmsnorm,
    official_rope,
    official_select,
    official_vision,
)
from safetensors import safe_open


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models are tiny: one intra-op thread avoids OpenMP oversubscription on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    out = {}
    for fam in FAMILIES:
        d = str(tmp_path_factory.mktemp(f"ref_{fam}"))
        out[fam] = (d, write_official_checkpoint(d, fam))
    return out


def _keys_and_shapes(ckpt_dir: str) -> dict:
    files = [f for f in os.listdir(ckpt_dir) if f.endswith(".safetensors")]
    shapes = {}
    for f in files:
        with safe_open(os.path.join(ckpt_dir, f), "pt") as h:
            for k in h.keys():
                shapes[k] = tuple(h.get_slice(k).get_shape())
    return shapes


# ------------------------------------------------------------------------------------------------ projector / tokens


def test_unfold_feature_order_is_channel_major_then_kernel_position():
    # 2x2 grid, 2 channels: value(c, i, j) = 100c + 10i + j at token i*2 + j
    x = torch.tensor([[[100.0 * c + 10 * i + j for c in range(2)] for i in range(2) for j in range(2)]])
    out = official_downsample_unfold(x, 2)
    assert out.shape == (1, 1, 8)
    assert out[0, 0].tolist() == [0, 1, 10, 11, 100, 101, 110, 111]


def test_unfold_pads_bottom_and_right_with_zeros():
    x = torch.arange(1.0, 10.0).view(1, 9, 1)  # 3x3 grid, 1 channel, row-major 1..9
    out = official_downsample_unfold(x, 2)
    assert out.shape == (1, 4, 4)
    assert out[0].tolist() == [[1, 2, 4, 5], [3, 0, 6, 0], [7, 8, 0, 0], [9, 0, 0, 0]]


def test_image_token_count_formula_matches_reference_numbers():
    assert image_grid_size(384, 14) == 14
    assert num_image_tokens(384, 14, 1, 1) == 421
    assert num_image_tokens(384, 14, 2, 2) == 1023
    assert num_image_tokens(384, 14, 3, 3) == 2017
    assert num_image_tokens(384, 14, 1, 9) == 2101  # tw=1, th=9 (384x3456 image)
    assert num_image_tokens(384, 14, 9, 1) == 1989
    # scaled families: tiny 70/14 -> 5x5 patches -> padded to 6x6 -> 3x3; small 64/16 and full 56/14 -> 2x2
    assert [image_grid_size(70, 14), image_grid_size(64, 16), image_grid_size(56, 14)] == [3, 2, 2]
    assert num_image_tokens(70, 14, 2, 1) == 3 * 4 + 1 + 3 * 7


def _gelu_exact(v: float) -> float:
    return 0.5 * v * (1 + math.erf(v / math.sqrt(2)))


def _gelu_tanh(v: float) -> float:
    return 0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))


def test_projector_uses_exact_gelu_between_identity_layers():
    pcfg = {"projector_type": "downsample_mlp_gelu", "depth": 2, "mlp_ratio": 1, "downsample_ratio": 2}
    sd = {
        "projector.layers.0.weight": torch.eye(4),
        "projector.layers.0.bias": torch.zeros(4),
        "projector.layers.2.weight": torch.eye(4),
        "projector.layers.2.bias": torch.tensor([0.0, 0.0, 0.0, 1.0]),
    }
    x = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64).view(1, 4, 1)  # 2x2 grid, 1 channel
    out = official_projector(x, {k: v.double() for k, v in sd.items()}, pcfg)
    expected = [_gelu_exact(1.0), _gelu_exact(-1.0), _gelu_exact(0.5), _gelu_exact(2.0) + 1.0]
    assert out.view(-1).tolist() == pytest.approx(expected, abs=1e-12)


def _tiny_vit(q_k_v_proj_fc1_fc2):
    """A 1-block ViT: image 2x2, patch 1, width 3, 1 head; conv copies RGB; pos_embed = 0.1 * k**1.5."""
    qkv, proj, fc1, fc2 = q_k_v_proj_fc1_fc2
    w = 3
    sd = {
        "patch_embed.proj.weight": torch.eye(w).view(w, 3, 1, 1),
        "patch_embed.proj.bias": torch.zeros(w),
        "pos_embed": 0.1 * torch.arange(12.0).view(1, 4, w) ** 1.5,
        "blocks.0.norm1.weight": torch.ones(w),
        "blocks.0.norm1.bias": torch.zeros(w),
        "blocks.0.attn.qkv.weight": qkv,
        "blocks.0.attn.qkv.bias": torch.zeros(3 * w),
        "blocks.0.attn.proj.weight": proj,
        "blocks.0.attn.proj.bias": torch.zeros(w),
        "blocks.0.norm2.weight": torch.ones(w),
        "blocks.0.norm2.bias": torch.zeros(w),
        "blocks.0.mlp.fc1.weight": fc1,
        "blocks.0.mlp.fc1.bias": torch.zeros(fc1.shape[0]),
        "blocks.0.mlp.fc2.weight": fc2,
        "blocks.0.mlp.fc2.bias": torch.zeros(w),
        "norm.weight": torch.ones(w),
        "norm.bias": torch.zeros(w),
    }
    return {k: v.double() for k, v in sd.items()}, {"image_size": 2, "patch_size": 1, "heads": 1, "layers": 1}


def test_vision_block_parts_hand_checked():
    g = torch.Generator().manual_seed(3)
    img = torch.randn(1, 3, 2, 2, generator=g, dtype=torch.float64)
    # tokens row-major over the patch grid, + pos_embed
    x0 = img[0].permute(1, 2, 0).reshape(4, 3) + 0.1 * torch.arange(12.0, dtype=torch.float64).view(4, 3) ** 1.5

    def ln(t):
        return torch.nn.functional.layer_norm(t, (3,), eps=1e-6)

    eye, zero = torch.eye(3), torch.zeros(3, 3)
    # (a) q = k = 0 -> uniform attention; v = identity rows (the LAST third of qkv); proj = I; MLP off
    sd, vcfg = _tiny_vit((torch.cat([zero, zero, eye]), eye, zero, zero))
    expected = ln(x0 + ln(x0).mean(0, keepdim=True))
    torch.testing.assert_close(official_vision(img, sd, vcfg)[0], expected)
    # (b) attention off; fc1 = fc2 = I: the block MLP uses tanh-GELU
    sd, vcfg = _tiny_vit((torch.cat([eye, eye, eye]), zero, eye, eye))
    y = ln(x0)
    expected = ln(x0 + y.apply_(_gelu_tanh))
    torch.testing.assert_close(official_vision(img, sd, vcfg)[0], expected)


@pytest.mark.parametrize("pos", ["head", "tail"])
def test_image_layout_global_newlines_separator_local_rows(pos):
    tw, th, h = 3, 2, 2  # 3 tiles wide, 2 tiles high, 2x2 tokens per tile
    # feature = (tile index, token index in the tile); newline = (-1, -1); separator = (-2, -2)
    tiles = torch.tensor([[[float(t), float(i)] for i in range(h * h)] for t in range(1 + tw * th)])
    seq = official_format_image(tiles, tw, th, torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -2.0]), pos)
    glob = []
    for r in range(h):
        glob += [(0, r * h + c) for c in range(h)] + [(-1, -1)]
    local = []
    for r in range(th * h):  # rows of the stitched local canvas
        for c in range(tw * h):
            tile = 1 + (r // h) * tw + (c // h)  # row-major tiles after the global view
            local.append((tile, (r % h) * h + (c % h)))
        local.append((-1, -1))
    expected = glob + [(-2, -2)] + local if pos == "head" else local + [(-2, -2)] + glob
    assert [tuple(int(v) for v in row) for row in seq] == expected
    assert len(expected) == h * (h + 1) + 1 + (h * th) * (h * tw + 1)


# ------------------------------------------------------------------------------------------------ RoPE / MLA


def test_official_rope_hand_computed_4dim():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 1, 1, 4)
    pos = torch.tensor([[1]])
    # theta 100, dim 4: inv_freq = [1, 100**-0.5] = [1, 0.1] -> angles 1 and 0.1 at position 1
    c0, s0, c1, s1 = math.cos(1.0), math.sin(1.0), math.cos(0.1), math.sin(0.1)
    # DeepSeek: de-interleave [x0,x1,x2,x3] -> [x0,x2,x1,x3], then rotate_half; result stays de-interleaved
    exp_ds = [1 * c0 - 2 * s0, 3 * c1 - 4 * s1, 2 * c0 + 1 * s0, 4 * c1 + 3 * s1]
    got = official_rope(x, pos, theta=100.0, deinterleave=True).view(-1).tolist()
    assert got == pytest.approx(exp_ds, abs=1e-6)
    # Llama / NeoX: rotate_half on the raw layout (pairs (x0,x2), (x1,x3))
    exp_neox = [1 * c0 - 3 * s0, 2 * c1 - 4 * s1, 3 * c0 + 1 * s0, 4 * c1 + 2 * s1]
    got = official_rope(x, pos, theta=100.0, deinterleave=False).view(-1).tolist()
    assert got == pytest.approx(exp_neox, abs=1e-6)
    # position 0: DeepSeek only permutes
    got0 = official_rope(x, torch.tensor([[0]]), theta=100.0).view(-1).tolist()
    assert got0 == pytest.approx([1, 3, 2, 4], abs=1e-12)


def test_official_rope_scores_equal_interleaved_pair_rotation():
    """De-interleave + rotate_half gives the same q.k as rotating adjacent pairs (GPT-J / complex form)."""
    g = torch.Generator().manual_seed(0)
    d, t, theta = 8, 5, 10000.0
    q = torch.randn(1, 1, t, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, t, d, generator=g, dtype=torch.float64)
    pos = torch.tensor([[0, 3, 4, 9, 11]])
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[0, :, None].double() * inv  # [t, d/2]

    def pairs(x):
        z = torch.view_as_complex(x[0, 0].reshape(t, d // 2, 2).contiguous())
        return z * torch.polar(torch.ones_like(ang), ang)

    ref = (pairs(q) @ pairs(k).conj().T).real
    got = official_rope(q, pos, theta) @ official_rope(k, pos, theta).transpose(-1, -2)
    torch.testing.assert_close(got[0, 0], ref, rtol=1e-5, atol=1e-5)


def test_yarn_softmax_scale_formula():
    lcfg = {"qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rope_scaling": None}
    assert mla_softmax_scale(lcfg) == pytest.approx(192**-0.5)
    lcfg["rope_scaling"] = {"type": "yarn", "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707}
    m = 0.1 * 0.707 * math.log(40) + 1.0
    assert mla_softmax_scale(lcfg) == pytest.approx(192**-0.5 * m * m)
    lcfg["rope_scaling"] = {"type": "yarn", "factor": 40, "mscale": 0.707}  # no mscale_all_dim -> no change
    assert mla_softmax_scale(lcfg) == pytest.approx(192**-0.5)


@pytest.mark.parametrize("q_lora_rank", [None, 12])
def test_absorbed_mla_equals_decompressed_mla(q_lora_rank):
    g = torch.Generator().manual_seed(1)
    hid, heads, nope, rope, vdim, rank, b, t = 40, 3, 16, 8, 12, 20, 2, 7
    lcfg = densify_config({"language_config": {}})["language_config"]
    lcfg.update(
        hidden_size=hid, num_attention_heads=heads, qk_nope_head_dim=nope, qk_rope_head_dim=rope,
        v_head_dim=vdim, kv_lora_rank=rank, q_lora_rank=q_lora_rank, rope_theta=500.0,
    )  # fmt: skip

    def rnd(*s, std=None):
        return torch.randn(*s, generator=g) * (std if std is not None else s[-1] ** -0.5)

    w = {
        "kv_a_proj_with_mqa.weight": rnd(rank + rope, hid),
        "kv_a_layernorm.weight": 1 + 0.1 * rnd(rank, std=1),
        "kv_b_proj.weight": rnd(heads * (nope + vdim), rank),
        "o_proj.weight": rnd(hid, heads * vdim),
    }
    if q_lora_rank is None:
        w["q_proj.weight"] = rnd(heads * (nope + rope), hid)
    else:
        w["q_a_proj.weight"] = rnd(q_lora_rank, hid)
        w["q_a_layernorm.weight"] = 1 + 0.1 * rnd(q_lora_rank, std=1)
        w["q_b_proj.weight"] = rnd(heads * (nope + rope), q_lora_rank)
    x = torch.randn(b, t, hid, generator=g)
    attn = torch.ones(b, t, dtype=torch.long)
    attn[1, 5:] = 0  # right padding on sample 1
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 1, 1]])
    mask = causal_padding_mask(attn, b, t, torch.float32)
    got = official_mla_absorbed(x, w, lcfg, pos, mask)

    # straightforward MLA: decompress K/V with kv_b_proj, K = [k_nope | k_pe broadcast over heads]
    if q_lora_rank is None:
        q = x @ w["q_proj.weight"].T
    else:
        q = official_rmsnorm(x @ w["q_a_proj.weight"].T, w["q_a_layernorm.weight"]) @ w["q_b_proj.weight"].T
    q = q.view(b, t, heads, nope + rope).transpose(1, 2)
    q_nope, q_pe = q[..., :nope], q[..., nope:]
    ckv = x @ w["kv_a_proj_with_mqa.weight"].T
    c, k_pe = ckv[..., :rank], ckv[..., rank:].view(b, 1, t, rope)
    kv = (official_rmsnorm(c, w["kv_a_layernorm.weight"]) @ w["kv_b_proj.weight"].T).view(b, t, heads, -1)
    kv = kv.transpose(1, 2)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    q_pe = official_rope(q_pe, pos, 500.0)
    k_pe = official_rope(k_pe, pos, 500.0).expand(b, heads, t, rope)
    qq, kk = torch.cat([q_nope, q_pe], -1), torch.cat([k_nope, k_pe], -1)
    s = qq @ kk.transpose(-1, -2) * (nope + rope) ** -0.5 + mask
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, heads * vdim) @ w["o_proj.weight"].T
    real = attn.bool()
    torch.testing.assert_close(got[real], o[real], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ router


def _lcfg(**kw):
    base = {
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
        "norm_topk_prob": False, "routed_scaling_factor": 1.0, "scoring_func": "sigmoid",
        "aux_loss_alpha": 0.001, "seq_aux": True, "topk_method": "greedy",
    }  # fmt: skip
    base.update(kw)
    return base


def _sorted(idx):
    return idx.sort(-1).values.tolist()


def test_group_limited_and_noaux_selection_hand_made():
    scores = torch.tensor(
        [
            [0.90, 0.06, 0.04, 0.00, 0.30, 0.29, 0.25, 0.10],  # greedy {0,4}; grouped (either rule) {0,1}
            [0.50, 0.05, 0.04, 0.00, 0.40, 0.35, 0.10, 0.10],  # group max picks g0 {0,1}; top-2 sum picks g1 {4,5}
        ]
    )
    greedy, _ = official_select(scores, None, _lcfg(topk_method="greedy"))
    assert _sorted(greedy) == [[0, 4], [0, 4]]
    glg, w = official_select(scores, None, _lcfg(topk_method="group_limited_greedy"))
    assert _sorted(glg) == [[0, 1], [0, 1]]
    zero = torch.zeros(8)
    noaux, w = official_select(scores, zero, _lcfg(topk_method="noaux_tc"))
    assert _sorted(noaux) == [[0, 1], [4, 5]]
    # the bias steers the choice (expert 6 in row 1), the weights stay the unbiased scores
    bias = torch.tensor([0.0, 0, 0, 0, 0, 0, 0.35, 0])
    idx, w = official_select(scores[1:], bias, _lcfg(topk_method="noaux_tc"))
    order = idx[0].argsort()
    assert idx[0][order].tolist() == [4, 6]
    assert w[0][order].tolist() == pytest.approx([0.40, 0.10])


def test_gate_normalisation_and_scaling():
    # identity router: logits = hidden; sigmoid scores chosen by logit(p)
    p = torch.tensor([[0.5, 0.05, 0.04, 0.01, 0.40, 0.35, 0.10, 0.10]])
    logits = torch.log(p / (1 - p))
    bias = torch.tensor([0.0, 0, 0, 0, 0, 0, 0.35, 0])
    cfg = _lcfg(topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.0)
    idx, w, aux = official_gate(logits, torch.eye(8), bias, cfg)
    order = idx[0].argsort()
    assert idx[0][order].tolist() == [4, 6]
    assert w[0][order].tolist() == pytest.approx([2.0 * 0.4 / 0.5, 2.0 * 0.1 / 0.5], rel=1e-5)
    assert aux is None  # eval
    with pytest.raises(AssertionError):
        official_gate(logits, torch.eye(8), bias, cfg, training=True)
    # without norm_topk_prob: w * routed_scaling_factor
    _, w2, _ = official_gate(logits, torch.eye(8), bias, _lcfg(topk_method="noaux_tc", routed_scaling_factor=2.0))
    assert sorted(w2[0].tolist()) == pytest.approx([0.2, 0.8], rel=1e-5)


def test_aux_losses_hand_computed():
    # softmax of log-probabilities gives the probabilities back: scores are exactly these rows
    probs = torch.tensor([[[0.7, 0.1, 0.1, 0.1], [0.5, 0.2, 0.2, 0.1]]])  # B=1, S=2, E=4
    cfg = _lcfg(n_routed_experts=4, num_experts_per_tok=1, scoring_func="softmax", aux_loss_alpha=0.5)
    idx, w, aux = official_gate(probs.log(), torch.eye(4), None, cfg, training=True)
    assert idx.view(-1).tolist() == [0, 0]
    # seq_aux: ce = counts / (S*k/E) = [2,0,0,0] / 0.5 = [4,0,0,0]; mean_s scores[0] = 0.6 -> 4*0.6*alpha
    assert aux.item() == pytest.approx(4 * 0.6 * 0.5, rel=1e-5)
    # global: fi = mean one-hot * E = [4,0,0,0]; Pi = mean scores -> same here
    _, _, aux_g = official_gate(probs.log(), torch.eye(4), None, {**cfg, "seq_aux": False}, training=True)
    assert aux_g.item() == pytest.approx(4 * 0.6 * 0.5, rel=1e-5)
    # two sequences that split differently: seq version averages per-sequence sums
    probs2 = torch.tensor([[[0.7, 0.1, 0.1, 0.1]], [[0.1, 0.6, 0.2, 0.1]]])  # B=2, S=1
    _, _, aux2 = official_gate(probs2.log(), torch.eye(4), None, cfg, training=True)
    # sample 0: ce=[4,0,0,0], s=0.7 -> 2.8; sample 1: ce=[0,4,0,0], s=0.6 -> 2.4; mean 2.6 * alpha
    assert aux2.item() == pytest.approx(2.6 * 0.5, rel=1e-5)
    _, _, aux2g = official_gate(probs2.log(), torch.eye(4), None, {**cfg, "seq_aux": False}, training=True)
    # fi = [2,2,0,0]; Pi = [0.4,0.35,0.15,0.1] -> 0.8 + 0.7 = 1.5
    assert aux2g.item() == pytest.approx(1.5 * 0.5, rel=1e-5)


def test_aux_loss_with_top2_hand_computed():
    probs = torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.35, 0.1, 0.25, 0.3]]])  # B=1, S=2, E=4, k=2
    cfg = _lcfg(n_routed_experts=4, num_experts_per_tok=2, scoring_func="softmax", aux_loss_alpha=0.1)
    idx, _, aux = official_gate(probs.log(), torch.eye(4), None, cfg, training=True)
    assert _sorted(idx) == [[0, 1], [0, 3]]
    # counts [2,1,0,1] / (S*k/E = 1); mean_s scores = [0.375, 0.2, 0.225, 0.2] -> 0.75 + 0.2 + 0.2 = 1.15
    assert aux.item() == pytest.approx(1.15 * 0.1, rel=1e-5)


def test_noaux_masked_groups_are_filled_with_zero_not_minus_inf():
    """Official quirk: experts of dropped groups compete with score 0.0, so with negative biased scores a
    dropped-group expert can be chosen. (The generated checkpoints keep biases positive so this never decides.)"""
    scores = torch.tensor([[0.60, 0.15, 0.10, 0.05, 0.20, 0.10, 0.05, 0.05]])
    bias = torch.tensor([0.0, -0.20, -0.20, -0.25, 0.0, 0.0, 0.0, 0.0])
    # biased group 0 = [0.6, -0.05, -0.1, -0.2] (top-2 sum 0.55) beats group 1 (0.30): group 0 is kept, but
    # its second-best biased score (-0.05) loses to the 0.0 of the masked group-1 experts
    idx, w = official_select(scores, bias, _lcfg(topk_method="noaux_tc"))
    chosen = sorted(idx[0].tolist())
    assert chosen[0] == 0 and chosen[1] in (4, 5, 6, 7)
    assert sorted(w[0].tolist()) == pytest.approx(sorted([0.60, scores[0, chosen[1]].item()]))


def test_default_topk_method_matches_no_branch():
    lcfg = densify_config({"language_config": {"n_routed_experts": 4, "num_experts_per_tok": 1}})
    lcfg = lcfg["language_config"]
    assert lcfg["topk_method"] == "gready"
    with pytest.raises(ValueError):
        official_gate(torch.randn(3, 4), torch.eye(4), None, lcfg)


# ------------------------------------------------------------------------------------------------ checkpoints


_ABSENT_EVERYWHERE = {
    "rms_norm_eps", "rope_theta", "rope_scaling", "moe_layer_freq", "aux_loss_alpha", "seq_aux",
    "attention_bias", "hidden_act", "tie_word_embeddings", "ep_size", "initializer_range",
}  # fmt: skip


def test_sparse_configs_lack_default_keys(ckpts):
    expected_absent = {
        "tiny": {"scoring_func", "norm_topk_prob", "routed_scaling_factor"},
        "small": {"use_mla", "bos_token_id", "eos_token_id", "scoring_func", "norm_topk_prob", "rm_head"},
        "full": {"use_mla", "num_key_value_heads", "moe_layer_freq"},
    }
    for fam, (d, dense) in ckpts.items():
        with open(os.path.join(d, "config.json")) as f:
            raw = json.load(f)
        assert raw == sparse_config(fam)
        assert set(raw) == {
            "candidate_resolutions", "global_view_pos", "language_config", "model_type", "projector_config",
            "tile_tag", "torch_dtype", "transformers_version", "vision_config",
        }  # fmt: skip
        assert (raw["model_type"], raw["tile_tag"], raw["global_view_pos"]) == ("deepseek_vl_v2", "2D", "head")
        assert len(raw["candidate_resolutions"]) == 23
        assert set(raw["vision_config"]) == {
            "model_name", "model_type", "layers", "mlp_ratio", "patch_size", "width", "image_size", "heads",
        }  # fmt: skip
        assert set(raw["projector_config"]) == {"model_type", "n_embed", "input_dim"}
        lang = raw["language_config"]
        absent = _ABSENT_EVERYWHERE | expected_absent[fam]
        assert not absent & set(lang), absent & set(lang)
        assert load_official_config(d) == dense
        assert dense["language_config"]["rms_norm_eps"] == 1e-6
        assert dense["language_config"]["rope_theta"] == 10000.0
        assert dense["language_config"]["moe_layer_freq"] == 1
    tiny, small, full = (ckpts[f][1]["language_config"] for f in FAMILIES)
    assert tiny["use_mla"] is False and tiny["kv_lora_rank"] is None and tiny["scoring_func"] == "softmax"
    assert tiny["routed_scaling_factor"] == 1.0 and tiny["norm_topk_prob"] is False
    assert ckpts["tiny"][1]["vision_config"]["image_size"] == 70
    assert small["use_mla"] is True and (small["bos_token_id"], small["eos_token_id"]) == (100000, 100001)
    assert full["use_mla"] is True and full["num_key_value_heads"] == 32 and full["num_attention_heads"] == 4
    assert (full["topk_method"], full["scoring_func"], full["routed_scaling_factor"]) == ("noaux_tc", "sigmoid", 2)


def test_checkpoint_keys_and_shapes(ckpts):
    tiny = _keys_and_shapes(ckpts["tiny"][0])
    small = _keys_and_shapes(ckpts["small"][0])
    full = _keys_and_shapes(ckpts["full"][0])
    for sd in (tiny, small, full):
        assert sd["vision.attn_pool.latent"] == (1, 1, 64)
        assert sd["vision.attn_pool.q.weight"] == (64, 64)
        assert sd["vision.attn_pool.kv.weight"] == (128, 64) and sd["vision.attn_pool.kv.bias"] == (128,)
        assert sd["vision.attn_pool.mlp.fc1.weight"] == (239, 64)  # int(64 * 3.7362)
        assert sd["vision.blocks.1.mlp.fc2.weight"] == (64, 239)
        assert sd["vision.blocks.0.attn.qkv.weight"] == (192, 64)
        assert "vision.blocks.2.norm1.weight" not in sd
        assert sd["projector.layers.0.weight"][1] == 256 and "projector.layers.1.weight" not in sd
        assert "language.model.layers.0.mlp.gate_proj.weight" in sd
        assert "language.model.layers.0.mlp.gate.weight" not in sd
        assert sd["language.model.layers.2.mlp.gate.weight"] == (8, sd["image_newline"][0])
        assert "language.model.layers.2.mlp.experts.7.down_proj.weight" in sd
        assert "language.model.layers.3.input_layernorm.weight" not in sd
    assert tiny["vision.pos_embed"] == (1, 25, 64) and tiny["vision.patch_embed.proj.weight"] == (64, 3, 14, 14)
    assert tiny["language.model.layers.1.self_attn.k_proj.weight"] == (64, 64)
    assert tiny["language.model.layers.1.mlp.shared_experts.up_proj.weight"] == (64, 64)  # 2 * 32
    assert small["vision.pos_embed"] == (1, 16, 64)
    assert small["language.model.layers.0.self_attn.q_proj.weight"] == (4 * 24, 64)
    assert small["language.model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == (32 + 8, 64)
    assert small["language.model.layers.0.self_attn.kv_b_proj.weight"] == (4 * (16 + 12), 32)
    assert small["language.model.layers.0.self_attn.o_proj.weight"] == (64, 4 * 12)
    assert small["language.lm_head.weight"] == (320, 64)
    assert "language.model.layers.0.self_attn.q_a_proj.weight" not in small
    assert not any("e_score_correction_bias" in k for k in list(tiny) + list(small))
    assert full["language.model.layers.0.self_attn.q_a_proj.weight"] == (24, 80)
    assert full["language.model.layers.0.self_attn.q_b_proj.weight"] == (4 * 24, 24)
    assert "language.model.layers.0.self_attn.q_proj.weight" not in full
    assert full["language.model.layers.1.mlp.gate.e_score_correction_bias"] == (8,)
    assert "language.model.layers.0.mlp.gate.e_score_correction_bias" not in full
    assert full["view_seperator"] == (80,) and full["image_newline"] == (80,)


def test_sharded_checkpoint_index_and_equal_logits(ckpts, tmp_path):
    d = str(tmp_path / "full_sharded")
    write_official_checkpoint(d, "full", sharded=True)
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shapes = _keys_and_shapes(d)
    assert set(index["weight_map"]) == set(shapes) == set(_keys_and_shapes(ckpts["full"][0]))
    assert index["metadata"]["total_size"] == sum(4 * math.prod(s) for s in shapes.values())
    a = load_official_state_dict(d)
    b = load_official_state_dict(ckpts["full"][0])
    assert all(torch.equal(a[k], b[k]) for k in a)
    # values sit on the bf16 grid (stored as fp32)
    assert all(torch.equal(v, v.bfloat16().float()) for v in a.values())


# ------------------------------------------------------------------------------------------------ whole forward


def _real(batch):
    return batch["attention_mask"].bool()


@pytest.mark.parametrize("fam", FAMILIES)
def test_forward_shapes_padding_and_routing(ckpts, fam):
    d, cfg = ckpts[fam]
    batch = make_official_batch(cfg)
    assert batch["images_seq_mask"].sum(1).tolist() == [
        sum(num_image_tokens(cfg["vision_config"]["image_size"], cfg["vision_config"]["patch_size"], *c) for c in cs)
        for cs in ([(2, 1), (1, 2)], [(1, 1)])
    ]
    assert batch["images"].shape[1] == 6 and batch["images_spatial_crop"][1, 1].tolist() == [0, 0]
    out = official_forward(d, batch)
    logits = out["logits"]
    assert logits.dtype == torch.float32
    assert logits.shape == (2, batch["input_ids"].shape[1], cfg["language_config"]["vocab_size"])
    assert torch.isfinite(logits).all() and 0.3 < logits[_real(batch)].std() < 3
    assert torch.isfinite(out["loss"])
    # no near-ties in the expert choice of real tokens (fp32 re-implementations pick the same experts)
    real = _real(batch).view(-1)
    assert len(out["router"]) == 2
    assert min(r["margin"][real].min().item() for r in out["router"]) > 2e-4
    # extra right padding and default positions change nothing for the real tokens
    padded = make_official_batch(cfg, extra_pad=3)
    out_p = official_forward(d, padded)
    t = batch["input_ids"].shape[1]
    torch.testing.assert_close(out_p["logits"][:, :t][_real(batch)], logits[_real(batch)], rtol=1e-5, atol=1e-5)
    no_pos = {k: v for k, v in batch.items() if k != "position_ids"}
    torch.testing.assert_close(official_forward(d, no_pos)["logits"][_real(batch)], logits[_real(batch)])


def test_images_causality_and_first_zero_crop_stops(ckpts):
    d, cfg = ckpts["tiny"]
    batch = make_official_batch(cfg)
    base = official_forward(d, batch)["logits"]
    # perturb image B of sample 0 (tiles 3..5): positions before it are unchanged, later ones change
    pert = dict(batch, images=batch["images"].clone())
    pert["images"][0, 3:6] += 0.5
    out = official_forward(d, pert)["logits"]
    first_b = 3 + num_image_tokens(70, 14, 2, 1) + 2
    torch.testing.assert_close(out[0, :first_b], base[0, :first_b])
    assert (out[0, first_b:] - base[0, first_b:]).abs().max() > 1e-3
    torch.testing.assert_close(out[1], base[1])
    # a non-zero crop after the first [0, 0] row is ignored
    junk = dict(batch)
    junk["images_spatial_crop"] = torch.cat([batch["images_spatial_crop"], torch.tensor([[[0, 0]], [[2, 2]]])], 1)
    torch.testing.assert_close(official_forward(d, junk)["logits"], base)
    # a sample without images
    no_img = make_official_batch(cfg, sample1_image=False)
    assert no_img["images_spatial_crop"][1].sum() == 0
    assert torch.isfinite(official_forward(d, no_img)["logits"]).all()


def test_full_router_bias_and_groups_matter(ckpts):
    d, cfg = ckpts["full"]
    batch = make_official_batch(cfg)
    out = official_forward(d, batch)
    sd = load_official_state_dict(d)
    lcfg = cfg["language_config"]
    real = _real(batch).view(-1)
    for r in out["router"]:
        bias = sd[f"language.model.layers.{r['layer']}.mlp.gate.e_score_correction_bias"]
        s = r["scores"][real]
        grouped = official_select(s, bias, lcfg)[0].sort(-1).values
        ungrouped = torch.topk(s + bias, 2, -1).indices.sort(-1).values
        unbiased = official_select(s, torch.zeros(8), lcfg)[0].sort(-1).values
        assert (grouped != ungrouped).any(-1).sum() > 5
        assert (grouped != unbiased).any(-1).sum() > 5
        # only the selected group's experts are used (topk_group = 1 of 2 groups of 4)
        assert ((grouped // 4)[:, 0] == (grouped // 4)[:, 1]).all()
    zeroed = {k: (torch.zeros_like(v) if "e_score_correction_bias" in k else v) for k, v in sd.items()}
    out0 = official_forward(None, batch, config=cfg, state_dict=zeroed)
    assert (out0["logits"] - out["logits"])[_real(batch)].abs().max() > 1e-3


def test_language_overrides_moe_layer_freq_and_yarn(tmp_path):
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 1.0}
    d = str(tmp_path / "small_yarn")
    cfg = write_official_checkpoint(d, "small", language_overrides={"moe_layer_freq": 2, "rope_scaling": yarn})
    shapes = _keys_and_shapes(d)
    # layer 1: 1 >= first_k_dense_replace but 1 % 2 != 0 -> dense; layer 2 -> MoE
    assert "language.model.layers.1.mlp.gate_proj.weight" in shapes
    assert "language.model.layers.2.mlp.gate.weight" in shapes
    batch = make_official_batch(cfg)
    out = official_forward(d, batch)
    assert [r["layer"] for r in out["router"]] == [2]
    assert torch.isfinite(out["logits"]).all()
    assert mla_softmax_scale(cfg["language_config"]) == pytest.approx(24**-0.5 * (0.1 * math.log(4.0) + 1) ** 2)
