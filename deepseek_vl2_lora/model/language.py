"""The DeepSeek-V2 language model: decoder layers (MLA or MHA attention, dense or MoE FFN), norm, lm_head.

Module names follow the checkpoint: `language.model.layers.{i}.{input_layernorm, self_attn, post_attention_layernorm,
mlp}`, `language.model.{embed_tokens, norm}`, `language.lm_head`.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import MHAttention, MLAttention, SegmentMask, build_attention_mask, positions_from_segments
from .config import LanguageConfig
from .moe import MLP, MoE
from .norm import RMSNorm
from .recompute import RECOMPUTE, recompute_attention_inputs, recompute_layer


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LanguageConfig, layer_idx: int, prefix: str, backend: str, experts_kernel: str):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        attn_cls = MLAttention if prefix == "mla" else MHAttention
        self.self_attn = attn_cls(cfg, backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(layer_idx):
            self.mlp = MoE(cfg, experts_kernel)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, position_ids, mask, past_kv=None, selective: bool = False):
        """`selective`: the attention's input side is recomputed in backward (recompute.py)."""
        fused = self.self_attn.backend != "eager" and not getattr(self.self_attn, "absorbed_reference", False)
        if selective and fused and past_kv is None:
            out, kv = recompute_attention_inputs(self._attend, x, position_ids, mask)
        else:
            out, kv = self._attend(x, position_ids, mask, past_kv)
        x = x + self.self_attn.o_proj(out)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            ffn, aux = self.mlp(h)
        else:
            ffn, aux = self.mlp(h), None
        return x + ffn, kv, aux

    def _attend(self, x, position_ids, mask, past_kv=None):
        return self.self_attn(self.input_layernorm(x), position_ids, mask, past_kv, project=False)


class DeepseekV2Model(nn.Module):
    def __init__(self, cfg: LanguageConfig, prefix: str, backend: str, experts_kernel: str):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, prefix, backend, experts_kernel) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.recompute = "none"  # none | selective | full, in training (recompute.py)

    @property
    def gradient_checkpointing(self) -> bool:
        """The older name: whole-layer recompute on or off."""
        return self.recompute == "full"

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.recompute = "full" if on else "none"

    def compile_layers(self, **options) -> None:
        """torch.compile every decoder layer in place (one graph per layer type; the layers share the code, so
        they share compiled kernels). Packed-row attention stays eager (its spans are host data)."""
        for layer in self.layers:
            layer.compile(**options)

    def forward(
        self,
        inputs_embeds,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        segment_ids=None,
        use_cache: bool = True,
    ):
        """-> (hidden [B, S, D], new past_key_values (list of per-layer (k, v); None without `use_cache`), summed
        aux loss or None). Without `use_cache` no layer's K and V outlive the layer (training keeps only what
        autograd saves, and with recompute not even that).

        `segment_ids [B, S]` marks packed rows (samples 1, 2, ... per row, 0 = padding): each sample attends only
        to itself and, without explicit `position_ids`, its positions restart at 0."""
        b, s, _ = inputs_embeds.shape
        past_len = 0 if not past_key_values else past_key_values[0][0].shape[2]
        if segment_ids is not None:
            if past_key_values:
                raise ValueError("segment_ids (packed rows) are for training and scoring; they take no KV cache")
            if position_ids is None:
                position_ids = positions_from_segments(segment_ids)
            mask = SegmentMask(segment_ids)
        else:
            if position_ids is None:
                position_ids = default_position_ids(attention_mask, b, s, past_len, inputs_embeds.device)
            mask = build_attention_mask(attention_mask, s, past_len + s)
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"recompute={self.recompute!r}; expected one of {', '.join(RECOMPUTE)}")
        recompute = self.recompute if self.training and torch.is_grad_enabled() else "none"
        x, new_cache, aux_total = inputs_embeds, [], None
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values else None
            if recompute == "full":
                x, kv, aux = recompute_layer(layer, x, position_ids, mask, past)
            else:
                x, kv, aux = layer(x, position_ids, mask, past, selective=recompute == "selective")
            if use_cache:
                new_cache.append(kv)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
        return self.norm(x), new_cache if use_cache else None, aux_total


def default_position_ids(attention_mask, b: int, s: int, past_len: int, device) -> torch.Tensor:
    """Positions count real tokens only (left padding shifts them); arange when there is no mask."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + s, device=device).expand(b, s)
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, past_len : past_len + s]


class DeepseekV2ForCausalLM(nn.Module):
    def __init__(self, cfg: LanguageConfig, prefix: str, backend: str, experts_kernel: str = "auto"):
        super().__init__()
        self.config = cfg
        self.model = DeepseekV2Model(cfg, prefix, backend, experts_kernel)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens
