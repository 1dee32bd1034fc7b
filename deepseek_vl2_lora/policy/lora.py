"""LoRA under the policy: one PEFT LoraConfig for every LoRA group (Linear targets by module name, stacked routed
experts by parameter name), our low-rank forward for the routed experts, and folding adapters into the weights."""

from __future__ import annotations

import functools
import re
import types

from torch import nn

from ..model.quant import QuantLinear
from .config import GROUP_NAMES, PolicyConfig


def _lora_config(model, cfg: PolicyConfig, matched: dict[str, list[str]]):
    """One PEFT LoraConfig: nn.Linear targets (quantized ones too) by exact module name, stacked experts by parameter
    name."""
    from peft import LoraConfig

    modules, params, rank_pattern, alpha_pattern = [], [], {}, {}
    quantized_targets = False
    spec0 = None
    for g in GROUP_NAMES:
        spec = getattr(cfg.groups, g)
        if spec.mode != "lora":
            continue
        spec0 = spec
        for name in matched[g]:
            owner_name, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            owner = model.get_submodule(owner_name) if owner_name else model
            if isinstance(owner, (nn.Linear, QuantLinear)) and leaf == "weight":
                target, bucket = owner_name, modules
                quantized_targets |= isinstance(owner, QuantLinear)
            elif g == "routed_experts":
                # Stacked [E, out, in] tensors: PEFT parameter targeting (a per-expert rank-r update). PEFT holds,
                # saves, loads and merges the adapter; the forward is ours (_use_low_rank_expert_lora).
                target, bucket = name, params
            else:
                continue  # norms inside a LoRA group, Linear biases: stay frozen
            if target not in bucket:
                bucket.append(target)
                if bucket is modules:  # parameter targets take the config's base r/alpha (set below)
                    rank_pattern[f"^{re.escape(target)}$"] = spec.r
                    alpha_pattern[f"^{re.escape(target)}$"] = spec.alpha
    if spec0 is None:
        return None
    init = True if spec0.init == "default" else spec0.init
    base = cfg.groups.routed_experts if params else spec0
    config = LoraConfig(
        r=base.r,
        lora_alpha=base.alpha,
        lora_dropout=spec0.dropout,
        use_rslora=spec0.rslora,
        use_dora=spec0.dora,
        init_lora_weights=init,
        target_modules=modules if modules or params else None,  # [] with parameter targets: PEFT must not guess
        target_parameters=params or None,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        bias="none",
    )
    if quantized_targets:  # (not part of the saved adapter config: the adapter is the same as on a bf16 base)
        config._register_custom_module({QuantLinear: quant_lora_linear()})
    return config


@functools.cache
def quant_lora_linear():
    """PEFT's LoRA Linear over a QuantLinear base: the base computes its (dequantized) output, the LoRA factors add
    theirs. PEFT knows no in/out features for a custom layer type; they are the base's."""
    from peft.tuners.lora.layer import Linear

    class QuantLoraLinear(Linear):
        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

    return QuantLoraLinear


def expert_lora_factors(wrapper) -> tuple[nn.Module, dict]:
    """(the RoutedExperts under a chain of PEFT ParamWrappers, {parameter name: [(B [E, out, r], A [E, r, in],
    scale), ...]}) for the active, unmerged adapters. The reshapes follow PEFT's layout of a 3-D target
    (`lora_A.weight` [E·r, in], `lora_B.weight` [out, r·E]); tests check B·A·scale against PEFT's own delta."""
    from peft.tuners.lora.layer import ParamWrapper

    factors: dict[str, list] = {}
    layer = wrapper
    while isinstance(layer, ParamWrapper):
        if not layer.disable_adapters and not layer.merged:
            for adapter in layer.active_adapters:
                if adapter not in layer.lora_A:
                    continue
                e = layer.num_experts
                a = layer.lora_A[adapter].weight
                b = layer.lora_B[adapter].weight
                a = a.reshape(e, -1, a.shape[-1])
                b = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)
                factors.setdefault(layer.parameter_name, []).append((b, a, layer.scaling[adapter]))
        layer = layer.base_layer
    return layer, factors


def _low_rank_expert_forward(self, x, idx, weight):
    experts, factors = expert_lora_factors(self)
    return experts(x, idx, weight, lora=factors)


def _use_low_rank_expert_lora(model: nn.Module) -> None:
    """PEFT applies a parameter-targeted LoRA by adding its dense per-expert delta (E·out·in values, for every
    expert) to the weight on each forward. Routed experts instead take the low-rank factors and apply them only
    to the tokens routed to each expert (`RoutedExperts.forward(lora=...)`), in both expert kernels."""
    from peft.tuners.lora.layer import ParamWrapper

    from ..model.moe import RoutedExperts

    for module in model.modules():
        if isinstance(module, ParamWrapper) and isinstance(module.get_base_layer(), RoutedExperts):
            module.forward = types.MethodType(_low_rank_expert_forward, module)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weight and remove the wrappers (PEFT layers, one level at a time,
    since stacked-expert targets nest)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..model.quant import quantized_weights

    if quantized_weights(model):
        raise ValueError(
            "merge_lora: the base weights are quantized; merge into the original weights instead "
            "(policy.merge.merge_checkpoint / scripts/merge.py read them from the base checkpoint)"
        )
    while True:
        found = next(((n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)), None)
        if found is None:
            break
        name, layer = found
        layer.merge()
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer.base_layer)
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model
