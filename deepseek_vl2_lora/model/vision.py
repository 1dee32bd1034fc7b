"""The vision side: timm's SigLIP ViT and the `downsample_mlp_gelu` projector.

SigLIP-SO400M settings as DeepSeek-VL2 runs them: tanh-GELU (timm's default would be exact GELU), no class
token, `forward_features` (all blocks, then the final `norm`). The attention-pool head (`attn_pool`) is built
and loaded because the checkpoint carries it, so a save writes it back, but it is never run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ProjectorConfig, VisionConfig


def build_vision_tower(cfg: VisionConfig) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    if cfg.class_token:
        raise ValueError("vision_config.class_token=true is not a DeepSeek-VL2 SigLIP tower")
    return VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=cfg.layers,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        class_token=False,
        global_pool=cfg.global_pool,
        num_classes=0,
        act_layer="gelu_tanh",
        weight_init="skip",
    )


class MlpProjector(nn.Module):
    """2×2 token merge by `F.unfold` (channel-major, then kernel position) followed by Linear-GELU-Linear."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        r = cfg.downsample_ratio
        hidden = cfg.n_embed * cfg.mlp_ratio
        mods: list[nn.Module] = [nn.Linear(cfg.input_dim * r * r, hidden)]
        for _ in range(1, cfg.depth):
            mods += [nn.GELU(), nn.Linear(hidden, cfg.n_embed)]
        self.layers = nn.Sequential(*mods)
        self.ratio = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, h*w, C] -> [T, ceil(h/r)*ceil(w/r), n_embed]."""
        t, hw, c = x.shape
        side = math.isqrt(hw)
        pad = (-side) % self.ratio
        x = x.reshape(t, side, side, c)
        if pad:
            x = F.pad(x, (0, 0, 0, pad, 0, pad))  # zero rows/cols at bottom and right
        x = F.unfold(x.permute(0, 3, 1, 2), kernel_size=self.ratio, stride=self.ratio)
        return self.layers(x.permute(0, 2, 1))
