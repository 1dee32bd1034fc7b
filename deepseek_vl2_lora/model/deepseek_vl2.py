"""DeepSeek-VL2: SigLIP tiles -> projector -> 2D tile layout scattered into the token embeddings -> DeepSeek-V2 LM.

The forward takes the official processor's batch fields by the same names:
`input_ids [B, T]`, `attention_mask [B, T]`, `images [B, max_tiles, 3, H, W]`, `images_seq_mask [B, T]`,
`images_spatial_crop [B, max_images, 2]` (= [num_width_tiles, num_height_tiles], zero rows are padding),
`labels [B, T]` (-100 = not supervised; shifted inside), `position_ids [B, T]` (optional), and for packed rows
`segment_ids [B, T]` (samples 1, 2, ... within a row, 0 = padding; each sample attends only to itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import resolve_attn_implementation, segment_starts
from .config import VL2Config
from .language import DeepseekV2ForCausalLM
from .lean import linear_cross_entropy, loss_chunk_rows
from .vision import MlpProjector, build_vision_tower

IGNORE_INDEX = -100


@dataclass
class VL2Output:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None  # mean token cross-entropy over labels != -100 (LM loss only)
    aux_loss: torch.Tensor | None = None  # MoE load-balancing loss summed over layers (already × alpha)
    past_key_values: list | None = None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE of token t+1 given tokens ≤ t over supervised positions; 0 (not NaN) when none is supervised."""
    logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def supervised_lm_loss(hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor, chunk: int = 1024):
    """The same loss as `causal_lm_loss(lm_head(hidden), labels)` without materialising full-vocab logits:
    lm_head runs only on positions whose next token is supervised (SFT supervises the answers only), in chunks
    whose gradients are formed right away (lean.linear_cross_entropy): no fp32 logits are kept for backward and
    lm_head does not run again there."""
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    targets = targets[keep]
    if isinstance(lm_head, nn.Linear):
        return linear_cross_entropy(h, lm_head.weight, targets, chunk) / keep.sum().clamp(min=1)
    # A quantized lm_head (model.quantize_lm_head): the module dequantizes its weight per call; its chunks are
    # recomputed in backward instead (no fp32 logits kept).
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        part = (h[start : start + chunk], targets[start : start + chunk])
        total = total + checkpoint(_chunk_ce_module, lm_head, *part, use_reentrant=False)
    return total / keep.sum().clamp(min=1)


def _chunk_ce_module(lm_head, h, targets):
    return F.cross_entropy(lm_head(h).float(), targets, reduction="sum")


class DeepseekVL2ForCausalLM(nn.Module):
    def __init__(self, config: VL2Config, attn_implementation: str = "eager", experts_kernel: str = "auto"):
        super().__init__()
        self.config = config
        lm = config.language
        prefix, backend = resolve_attn_implementation(attn_implementation, lm.use_mla)
        self.attn_implementation = f"{prefix}_{backend}"
        self.vision = build_vision_tower(config.vision)
        self.projector = MlpProjector(config.projector)
        n = config.projector.n_embed
        self.image_newline = nn.Parameter(torch.randn(n) / math.sqrt(n))
        self.view_seperator = nn.Parameter(torch.randn(n) / math.sqrt(n))  # (sic) the checkpoint's spelling
        self.language = DeepseekV2ForCausalLM(lm, prefix, backend, experts_kernel)
        self.loss_chunk_tokens = loss_chunk_rows(lm.vocab_size)  # supervised positions per lm_head chunk
        self.feature_cache = None  # a VisionFeatureCache, attached by the trainer when configured
        # A forward given an image batch without images still runs the vision side (on a blank tile, result
        # unused): set while ranks evaluate different batches under ZeRO-3, where a rank whose batch has images
        # gathers the sharded vision weights and every other rank must take part (evaluation/ranks.py).
        self.vision_in_every_forward = False

    # ------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path,
        torch_dtype=torch.float32,
        attn_implementation="eager",
        experts_kernel="auto",
        device=None,
        quantize: str = "none",
        quantize_lm_head: bool = False,
        keep_unquantized=None,
    ):
        """The checkpoint in `path` (official layout). `quantize` (nf4 | int8) stores the frozen language-model
        weights quantized (quant.py), quantizing shard by shard as they are read, so the full-precision model is
        never held whole; `keep_unquantized(name)` exempts weights by parameter name (those a policy trains)."""
        from .checkpoint import load_pretrained

        quant = (quantize, quantize_lm_head, keep_unquantized)
        return load_pretrained(cls, Path(path), torch_dtype, attn_implementation, experts_kernel, device, *quant)

    def save_pretrained(self, path, max_shard_size: int | str = "5GB", extra_files=()) -> None:
        """The official layout: config.json + safetensors, sharded above `max_shard_size` (HF-style sizes)."""
        from .checkpoint import save_pretrained

        save_pretrained(self, Path(path), max_shard_size, extra_files)

    def _head_weight(self) -> torch.Tensor:
        weight = getattr(self.language.lm_head, "weight", None)  # none when lm_head is quantized
        return weight if weight is not None else self.language.model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:
        return self._head_weight().dtype

    @property
    def device(self) -> torch.device:
        return self._head_weight().device

    # ------------------------------------------------------------------------------------- images
    def encode_tiles(self, tiles: torch.Tensor, tile_keys: list[str] | None = None) -> torch.Tensor:
        """[T, 3, H, W] -> [T, tokens_per_tile, D]. A frozen tower runs without building an autograd graph.

        With `self.feature_cache` set, tile keys given and vision + projector frozen, features come from the
        disk cache (computed and stored on a miss)."""
        cache = self.feature_cache
        if cache is not None and tile_keys is not None and not self._vision_side_trainable():
            return cache.encode(tiles, tile_keys, self._encode_tiles)
        return self._encode_tiles(tiles)

    def _vision_side_trainable(self) -> bool:
        return any(p.requires_grad for m in (self.vision, self.projector) for p in m.parameters())

    def _encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        vision_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(vision_grad):
            feats = self.vision.forward_features(tiles.to(self.vision.patch_embed.proj.weight.dtype))
        projector_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.projector.parameters())
        with torch.set_grad_enabled(projector_grad):
            return self.projector(feats)

    def _layout_image(self, tiles: torch.Tensor, tw: int, th: int) -> torch.Tensor:
        """Global view then `tw*th` local tiles -> the token sequence of one image (official 2D layout)."""
        side = math.isqrt(tiles.shape[1])
        d = tiles.shape[-1]
        nl = self.image_newline.to(tiles.dtype)
        glob = tiles[0].view(side, side, d)
        glob = torch.cat([glob, nl.expand(side, 1, d)], dim=1).reshape(-1, d)
        local = tiles[1:].view(th, tw, side, side, d).permute(0, 2, 1, 3, 4).reshape(th * side, tw * side, d)
        local = torch.cat([local, nl.expand(th * side, 1, d)], dim=1).reshape(-1, d)
        sep = self.view_seperator.to(tiles.dtype)[None]
        if self.config.global_view_pos == "head":
            return torch.cat([glob, sep, local])
        return torch.cat([local, sep, glob])

    def prepare_inputs_embeds(
        self, input_ids, images=None, images_seq_mask=None, images_spatial_crop=None, tile_keys=None
    ):
        """Token embeddings with each image's features scattered in. `tile_keys` (per sample, one key per tile
        of `images[b]`, from the collator) lets a feature cache serve the frozen vision side."""
        embeds = self.language.get_input_embeddings()(input_ids)
        if images is None or images_spatial_crop is None or not bool(images_spatial_crop.any()):
            if images is not None and self.vision_in_every_forward:
                self._encode_tiles(images.new_zeros(1, *images.shape[-3:]))
            return embeds
        if images_seq_mask is None:
            raise ValueError("images given without images_seq_mask")
        crops = images_spatial_crop.tolist()
        per_sample, tiles, keys = [], [], []
        for b, rows in enumerate(crops):
            shapes = []
            for tw, th in rows:
                if tw == 0 or th == 0:  # zero rows pad the image list
                    break
                shapes.append((tw, th))
            n_tiles = sum(1 + tw * th for tw, th in shapes)
            if n_tiles > images.shape[1]:
                raise ValueError(
                    f"sample {b}: images_spatial_crop needs {n_tiles} tiles but images has {images.shape[1]}"
                )
            per_sample.append(shapes)
            tiles.append(images[b, :n_tiles])
            if tile_keys is not None:
                keys += tile_keys[b][:n_tiles]
        feats = self.encode_tiles(torch.cat(tiles), keys if tile_keys is not None else None).to(embeds.dtype)
        pieces, t = [], 0
        expected = images_seq_mask.sum(dim=1).tolist()
        for b, shapes in enumerate(per_sample):
            n_feats = 0
            for tw, th in shapes:
                pieces.append(self._layout_image(feats[t : t + 1 + tw * th], tw, th))
                n_feats += pieces[-1].shape[0]
                t += 1 + tw * th
            if n_feats != expected[b]:
                raise ValueError(
                    f"sample {b}: images_seq_mask marks {expected[b]} image positions but its images "
                    f"{shapes} give {n_feats} features"
                )
        # masked_scatter fills positions in row-major order, i.e. sample by sample: pieces are in that order.
        return embeds.masked_scatter(images_seq_mask.unsqueeze(-1).to(embeds.device), torch.cat(pieces))

    # ------------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        images=None,
        images_seq_mask=None,
        images_spatial_crop=None,
        labels=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache: bool = False,
        return_logits: bool = True,
        tile_keys=None,
        segment_ids=None,
    ) -> VL2Output:
        """`return_logits=False` (training) computes the loss on supervised positions only, without full fp32
        logits; the loss is the same function."""
        if inputs_embeds is None:
            inputs_embeds = self.prepare_inputs_embeds(
                input_ids, images, images_seq_mask, images_spatial_crop, tile_keys
            )
        if segment_ids is not None and labels is not None:
            # A sample's first token must not be predicted from the previous sample's last one.
            labels = labels.masked_fill(segment_starts(segment_ids), IGNORE_INDEX)
        hidden, cache, aux = self.language.model(
            inputs_embeds, attention_mask, position_ids, past_key_values, segment_ids, use_cache
        )
        if not return_logits:
            loss = None
            if labels is not None:
                loss = supervised_lm_loss(hidden, self.language.lm_head, labels, self.loss_chunk_tokens)
            return VL2Output(logits=None, loss=loss, aux_loss=aux, past_key_values=cache)
        logits = self.language.lm_head(hidden)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return VL2Output(logits=logits.float(), loss=loss, aux_loss=aux, past_key_values=cache)
