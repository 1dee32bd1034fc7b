"""Where the step's activations live and what its recompute costs: every module of the model by kind (attention,
routed experts, ...) so the tracker can count activation bytes per kind, and the matmul FLOPs of each op, so it
can tell the FLOPs a recompute setting adds.

A tensor made in the forward pass belongs to the innermost module running when it was made; a module without a
kind of its own takes its parent's (a PEFT adapter inside `o_proj` is attention, `mlp.experts`' LoRA wrapper is
routed experts). Ops outside every module are the input embeddings before the language model runs and the loss
after it.
"""

from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import flop_registry

KINDS = (
    "attention",
    "routed experts",
    "shared experts + dense MLP",
    "router",
    "norms",
    "residual stream",
    "embeddings",
    "lm_head / loss",
    "vision",
    "batch",
)
BEFORE_LM, AFTER_LM = "embeddings", "lm_head / loss"


def module_kinds(model: torch.nn.Module) -> tuple[dict[int, str], dict[str, int]]:
    """({id(module): kind} for every named module, {kind: how many decoder layers hold one}). Layer counts are the
    per-layer denominators: routed experts and the router live in MoE layers only, the MLP kind in every layer
    with a dense MLP or shared experts."""
    from ..model.attention import MHAttention, MLAttention
    from ..model.language import DecoderLayer, DeepseekV2Model
    from ..model.moe import MLP, MoE, RoutedExperts, Router
    from ..model.norm import RMSNorm

    own = [
        ((MLAttention, MHAttention), "attention"),
        ((MoE, RoutedExperts), "routed experts"),
        ((MLP,), "shared experts + dense MLP"),
        ((Router,), "router"),
        ((RMSNorm,), "norms"),
        ((DecoderLayer, DeepseekV2Model), "residual stream"),
        ((torch.nn.Embedding,), "embeddings"),
    ]
    by_name: dict[str, str | None] = {}
    kinds: dict[int, str] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        top = name.split(".")[0]
        kind = next((k for classes, k in own if isinstance(module, classes)), None)
        if kind is None and top in ("vision", "projector"):
            kind = "vision"
        if kind is None and name.endswith("lm_head"):
            kind = AFTER_LM
        kind = kind or by_name.get(name.rpartition(".")[0])
        by_name[name] = kind
        if kind is not None:
            kinds[id(module)] = kind
    layers = [m for m in model.modules() if isinstance(m, DecoderLayer)]
    moe = sum(isinstance(layer.mlp, MoE) for layer in layers)
    mlp = sum(
        (isinstance(layer.mlp, MLP) or getattr(layer.mlp, "shared_experts", None) is not None) for layer in layers
    )
    counts = dict.fromkeys(("attention", "norms", "residual stream"), len(layers))
    counts.update({"routed experts": moe, "router": moe, "shared experts + dense MLP": mlp})
    return kinds, counts


def is_language_model(module: torch.nn.Module) -> bool:
    from ..model.language import DeepseekV2Model

    return isinstance(module, DeepseekV2Model)


# ---------------------------------------------------------------------------------------------------- FLOPs
aten = torch.ops.aten


def _shape(t) -> tuple[int, ...]:
    return tuple(t.shape)


def _grouped_mm_flops(a, b, *args, out_val=None, **kwargs) -> int:
    """`torch._grouped_mm`: every output element is a dot product over the shared inner dimension. A 2-D × 2-D
    call (the weight gradient) has the groups in the inner dimension: its output [G, M, N] sums over K = a's
    columns in total, once per group."""
    out = _shape(out_val)
    if a.dim() == 2 and b.dim() == 2:  # [M, K_total] × [K_total, N] -> [G, M, N]
        return 2 * out[1] * out[2] * a.shape[1]
    return 2 * math.prod(out) * a.shape[-1]


def _cpu_flash_flops(q, k, v, *args, out_val=None, **kwargs) -> int:
    """The CPU flash kernel: as the CUDA fused kernels count it (QKᵀ and PV over every pair; the causal half is
    not subtracted by PyTorch's counter either)."""
    b, h, s_q, d_qk = _shape(q)
    s_k, d_v = k.shape[-2], v.shape[-1]
    return 2 * b * h * s_q * s_k * (d_qk + d_v)


def _cpu_flash_backward_flops(grad_out, q, k, v, *args, out_val=None, **kwargs) -> int:
    return 2 * _cpu_flash_flops(q, k, v)  # dQ, dK, dV and the recomputed probabilities: 2.5 × in theory


EXTRA_FLOPS = {
    aten._grouped_mm.default: _grouped_mm_flops,
    aten._scaled_dot_product_flash_attention_for_cpu.default: _cpu_flash_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward.default: _cpu_flash_backward_flops,
}


def op_flops(func, args, kwargs, out) -> int:
    """Matmul and attention FLOPs of one aten op (PyTorch's FlopCounterMode formulas, plus the grouped GEMM and
    the CPU flash kernel); 0 for elementwise and data-movement ops."""
    if func in EXTRA_FLOPS:
        return EXTRA_FLOPS[func](*args, **kwargs, out_val=out)
    packet = func.overloadpacket
    if packet in flop_registry:
        return flop_registry[packet](*args, **kwargs, out_val=out)
    return 0
