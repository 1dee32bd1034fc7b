"""Whole-model behaviour: image token layout, loss, padding, text-only samples, checkpointing, generation."""

import pytest
import torch
import torch.nn.functional as F
from helpers import FAMILIES, build_model, make_batch, tokens_per_image

from deepseek_vl2_lora.model import VL2Config
from deepseek_vl2_lora.model.generation import generate
from deepseek_vl2_lora.model.tiny import family_config


def test_token_layout_for_2x1_tiling_by_hand():
    """Global 2D view with a newline column, the separator, then 2 local tiles side by side row by row."""
    model = build_model("tiny-mha")
    cfg = model.config
    side = 2  # 64 px tiles / 16 px patches = 4 patches -> 2×2 after the 2×2 merge
    d = cfg.language.hidden_size
    n = tokens_per_image(cfg, tw=2, th=1)
    assert n == side * (side + 1) + 1 + side * (2 * side + 1) == 17

    def fake_tiles(tiles, tile_keys=None):  # tile t, token p -> value 100*t + p in channel 0
        t = torch.arange(tiles.shape[0])[:, None] * 100 + torch.arange(side * side)[None]
        return F.pad(t.float()[..., None], (0, d - 1))

    model.encode_tiles = fake_tiles
    with torch.no_grad():
        model.image_newline.fill_(-1.0)
        model.view_seperator.fill_(-2.0)
    ids = torch.zeros(1, n + 2, dtype=torch.long)
    mask = torch.zeros(1, n + 2, dtype=torch.bool)
    mask[0, 1 : n + 1] = True
    emb = model.prepare_inputs_embeds(ids, torch.zeros(1, 3, 3, 64, 64), mask, torch.tensor([[[2, 1]]]))
    got = emb[0, 1 : n + 1, 0].tolist()
    # By hand: global tile 0 = [[0, 1], [2, 3]]; local tiles 1 = [[100, 101], [102, 103]], 2 = [[200, ...]].
    expected = [0, 1, -1, 2, 3, -1, -2, 100, 101, 200, 201, -1, 102, 103, 202, 203, -1]
    assert got == expected


def test_global_view_tail_puts_local_first():
    model = build_model("tiny-mha")
    model.config.global_view_pos = "tail"
    tiles = torch.arange(3 * 4, dtype=torch.float32).view(3, 4, 1).expand(3, 4, 64)
    with torch.no_grad():
        model.image_newline.fill_(-1.0)
        model.view_seperator.fill_(-2.0)
    seq = model._layout_image(tiles, tw=1, th=2)[:, 0].tolist()
    # local tiles stacked vertically (th=2): rows [4,5],[6,7],[8,9],[10,11] each + newline; sep; global.
    assert seq == [4, 5, -1, 6, 7, -1, 8, 9, -1, 10, 11, -1, -2, 0, 1, -1, 2, 3, -1]


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_is_mean_ce_over_supervised_shifted_tokens(family):
    model = build_model(family).eval()
    batch = make_batch(model.config)
    out = model(**batch)
    logits, labels = out.logits, batch["labels"]
    total, count = 0.0, 0
    for b in range(2):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] != -100:
                total += -torch.log_softmax(logits[b, t].double(), -1)[labels[b, t + 1]].item()
                count += 1
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("train_lm_head,chunk", [(False, 4096), (True, 4096), (True, 5)])
def test_loss_without_logits_equals_full_loss_and_gradients(train_lm_head, chunk):
    """The supervised-positions, chunked, recomputed CE is the same function as CE over full logits."""
    results = []
    for return_logits in (True, False):
        model = build_model("full-noaux").train()
        model.language.lm_head.weight.requires_grad_(train_lm_head)
        model.loss_chunk_tokens = chunk
        out = model(**make_batch(model.config), return_logits=return_logits)
        (out.loss + out.aux_loss).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.loss.detach(), grads))
        assert (out.logits is None) == (not return_logits)
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert results[0][1].keys() == results[1][1].keys()
    assert ("language.lm_head.weight" in results[0][1]) == train_lm_head
    for n in results[0][1]:
        assert torch.allclose(results[0][1][n], results[1][1][n], atol=1e-6), n


def test_padding_side_and_text_only_sample_do_not_change_real_tokens():
    """Sample 1 (text only) alone == in a mixed batch, right- or left-padded (positions follow the mask)."""
    model = build_model("small-mla", attn_implementation="sdpa").eval()
    for pad in ("right", "left"):
        batch = make_batch(model.config, pad=pad)
        with torch.no_grad():
            mixed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[1]
            real = batch["attention_mask"][1].bool()
            alone = model(input_ids=batch["input_ids"][1:, real]).logits[0]
        assert torch.allclose(mixed[real], alone, atol=1e-4), pad


def test_eager_and_sdpa_agree_on_the_whole_model():
    for family in FAMILIES:
        batch = make_batch(build_model(family).config)
        outs = []
        for impl in ("eager", "sdpa"):
            with torch.no_grad():
                outs.append(build_model(family, attn_implementation=impl).eval()(**batch).logits)
        real = batch["attention_mask"].bool()
        assert torch.allclose(outs[0][real], outs[1][real], atol=1e-4), family


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = build_model("full-noaux").train()
        model.language.model.gradient_checkpointing = ckpt
        out = model(**make_batch(model.config))
        (out.loss + out.aux_loss).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_frozen_vision_builds_no_graph():
    model = build_model("tiny-mha").train()
    for p in list(model.vision.parameters()) + list(model.projector.parameters()):
        p.requires_grad_(False)
    feats = model.encode_tiles(torch.randn(2, 3, 64, 64))
    assert not feats.requires_grad
    assert all(block.attn.fused_attn for block in model.vision.blocks)  # timm's attention on SDPA
    model.projector.layers[0].weight.requires_grad_(True)
    assert model.encode_tiles(torch.randn(2, 3, 64, 64)).requires_grad


def test_mismatched_image_mask_is_a_clear_error():
    model = build_model("tiny-mha")
    batch = make_batch(model.config)
    batch["images_seq_mask"][0, -1] = True
    with pytest.raises(ValueError, match="sample 0: images_seq_mask marks"):
        model(**batch)


@pytest.mark.parametrize("family", ["tiny-mha", "full-noaux"])
def test_generation_with_and_without_cache_is_equal(family):
    model = build_model(family).eval()
    batch = make_batch(model.config, pad="left")
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "images", "images_seq_mask", "images_spatial_crop")}
    a = generate(model, **kw, max_new_tokens=6, use_cache=True)
    b = generate(model, **kw, max_new_tokens=6, use_cache=False)
    assert a.shape == (2, 6)
    assert torch.equal(a, b)


def test_sparse_config_takes_official_defaults():
    """Defaults from the official DeepseekV2Config (reference §2), not from this package's tiny families."""
    raw = family_config("small-mla", 100)
    for key in (
        "q_lora_rank",
        "kv_lora_rank",
        "use_mla",
        "qk_rope_head_dim",
        "v_head_dim",
        "qk_nope_head_dim",
        "norm_topk_prob",
        "scoring_func",
        "routed_scaling_factor",
        "rms_norm_eps",
        "aux_loss_alpha",
    ):
        raw["language_config"].pop(key, None)
    raw["vision_config"] = {
        "model_type": "vision",
        "width": 64,
        "layers": 1,
        "patch_size": 14,
        "mlp_ratio": 3.7362,
    }
    cfg = VL2Config.from_dict(raw).language
    assert cfg.q_lora_rank == 1536 and cfg.kv_lora_rank == 512 and cfg.use_mla is True
    assert (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim) == (128, 64, 128)
    assert cfg.norm_topk_prob is False and cfg.scoring_func == "softmax" and cfg.routed_scaling_factor == 1.0
    assert cfg.rms_norm_eps == 1e-6 and cfg.aux_loss_alpha == 0.001 and cfg.seq_aux is True
    vis = VL2Config.from_dict(raw).vision
    assert (vis.image_size, vis.heads) == (384, 16)


def test_official_default_topk_method_is_rejected_with_the_reason():
    raw = family_config("small-mla", 100)
    raw["language_config"].pop("topk_method")
    with pytest.raises(ValueError, match="'gready' matches no branch"):
        VL2Config.from_dict(raw)
