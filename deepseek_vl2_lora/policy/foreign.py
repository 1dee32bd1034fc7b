"""The policy a stock PEFT LoRA adapter for this architecture amounts to (an adapter without our policy.json).

PEFT itself says what the adapter touches: its config is injected into a meta-device copy of the model (no memory,
no init), and the wrapped Linear layers and stacked expert tensors are read off, with the rank and alpha PEFT gave
each (rank_pattern, alpha_pattern, layers_to_transform and exclude_modules included). `modules_to_save` matches as
PEFT matches it (a module name ending with the entry). A policy trains whole groups, over all decoder layers or a
subset of them, so the adapter maps onto a policy when each group it touches is touched whole (in the layers it
touches) and with one rank and alpha; otherwise a one-line error names the targets that map onto no group.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .config import GROUP_NAMES, PolicyConfig
from .groups import PolicyError, base_name, group_of, layer_of, resolve_groups, to_policy_config

_LAYER_PREFIX = "language.model.layers."


def _skeleton(config) -> nn.Module:
    from ..model.deepseek_vl2 import DeepseekVL2ForCausalLM

    with torch.device("meta"):
        return DeepseekVL2ForCausalLM(config)


def _short(name: str) -> str:
    """A parameter name without its layer prefix, for messages (`self_attn.q_proj.weight`)."""
    if name.startswith(_LAYER_PREFIX):
        return name[len(_LAYER_PREFIX) :].partition(".")[2]
    return name


def _lora_targets(skeleton: nn.Module, config) -> tuple[dict[str, tuple[int, float]], list[str]]:
    """({parameter PEFT adapts: (r, alpha)}, modules PEFT wrapped that no policy can hold) of `config` injected
    into `skeleton` (a model on the meta device, which this changes)."""
    from peft import inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import ParamWrapper

    inject_adapter_in_model(config, skeleton, adapter_name="default")
    targets, other = {}, []
    for name, module in skeleton.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.r:
            continue
        if isinstance(module, ParamWrapper):
            param = f"{base_name(name)}.{module.parameter_name}"
        elif isinstance(module, LoraLinear):
            param = f"{base_name(name)}.weight"
        else:
            other.append(base_name(name))
            continue
        targets[param] = (module.r["default"], module.lora_alpha["default"])
    return targets, other


def _modules_to_save(model: nn.Module, entries: list[str]) -> set[str]:
    """The parameters of the modules PEFT's `modules_to_save` wraps (a module name ending with an entry)."""
    params = set()
    for name, module in model.named_modules():
        if name and any(name.endswith(entry) for entry in entries):
            params.update(f"{name}.{p}" for p, _ in module.named_parameters())
    return params


def _as_group(chosen: set[str], available: list[str]) -> list[int] | None | bool:
    """How a policy group expresses `chosen` out of its `available` parameters: None (all of them), the decoder
    layers (a whole-layer subset), or False (not expressible)."""
    if chosen == set(available):
        return None
    layers = {layer_of(n) for n in chosen}
    if None in layers or not chosen <= set(available):
        return False
    return sorted(layers) if chosen == {n for n in available if layer_of(n) in layers} else False


def policy_from_adapter(vl2_config, adapter_config: Path) -> PolicyConfig:
    """The PolicyConfig a stock PEFT LoRA adapter (its adapter_config.json) amounts to on the architecture
    `vl2_config` (a VL2Config) describes; a PolicyError (one line) when it is not LoRA or touches part of a group."""
    from peft import LoraConfig

    raw = json.loads(Path(adapter_config).read_text())
    where = Path(adapter_config).parent
    if raw.get("peft_type") != "LORA":
        raise PolicyError(f"{adapter_config}: peft_type {raw.get('peft_type')!r}; only LoRA adapters map onto a policy")
    fields = set(LoraConfig.__dataclass_fields__)
    try:
        config = LoraConfig(**{k: v for k, v in raw.items() if k in fields and k not in ("peft_type", "task_type")})
    except (TypeError, ValueError) as e:
        raise PolicyError(f"{adapter_config}: not a LoRA config PEFT reads ({_one_line(e)})") from None
    config.init_lora_weights = False  # shapes only: the weights come from the adapter
    if config.lora_bias or config.fan_in_fan_out:
        raise PolicyError(f"{adapter_config}: lora_bias / fan_in_fan_out adapters map onto no policy")
    use_mla = vl2_config.language.use_mla
    skeleton = _skeleton(vl2_config)
    groups = resolve_groups(skeleton, PolicyConfig())
    adaptable = {
        g: [n for n in names if n.endswith(".weight") and isinstance(_owner(skeleton, n), nn.Linear)]
        for g, names in groups.items()
    }
    adaptable["routed_experts"] = [n for n in groups["routed_experts"] if not n.endswith(".weight")]
    trained = _modules_to_save(skeleton, list(config.modules_to_save or []))
    try:
        targets, other = _lora_targets(skeleton, config)
    except ValueError as e:  # e.g. PEFT's "Target modules ... not found in the base model"
        raise PolicyError(f"{where}: {_one_line(e)}") from None
    unmapped = [f"{m} (no LoRA layer a policy has)" for m in other]
    specs: dict[str, dict] = {}
    for g in GROUP_NAMES:
        lora = {n: rank for n, rank in targets.items() if group_of(n, use_mla) == g}
        full = {n for n in trained if group_of(n, use_mla) == g}
        if lora and full:
            unmapped.append(f"group {g} both LoRA-adapted and saved whole")
            continue
        if lora:
            ranks = set(lora.values())
            layers = _as_group(set(lora), adaptable[g])
            if layers is False or len(ranks) > 1:
                why = "part of the group" if layers is False else f"ranks/alphas {sorted(ranks)}"
                unmapped.append(f"{', '.join(sorted({_short(n) for n in lora}))} ({why} {g})")
                continue
            ((r, alpha),) = ranks
            specs[g] = {"mode": "lora", "r": r, "alpha": alpha, "layers": layers}
        elif full:
            layers = _as_group(full, groups[g])
            if layers is False:
                unmapped.append(f"{', '.join(sorted({_short(n) for n in full}))} (modules_to_save: part of {g})")
                continue
            specs[g] = {"mode": "train", "layers": layers}
    if unmapped:
        raise PolicyError(
            f"{where}: adapter targets that map onto no policy group: {'; '.join(unmapped)}. A policy adapts or "
            "trains whole groups (deepseek_vl2_lora/policy/groups.py), in all decoder layers or a subset"
        )
    if not specs:
        raise PolicyError(f"{where}: the adapter adapts and saves nothing of this model (no target matched)")
    shared = {"dropout": config.lora_dropout, "rslora": config.use_rslora, "dora": bool(config.use_dora)}
    for spec in specs.values():
        if spec["mode"] == "lora":
            spec.update(shared)
    return to_policy_config({"name": f"adapter:{where.name}", "groups": specs})


def _owner(model: nn.Module, param: str) -> nn.Module:
    owner, _, _ = param.rpartition(".")
    return model.get_submodule(owner) if owner else model


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())
