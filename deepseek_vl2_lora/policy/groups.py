"""The freezing policy: named parameter groups, their resolution against a real checkpoint, PEFT LoRA, trained state.

Groups are defined once, in `GROUPS` below; every parameter of the model belongs to exactly one of them.
The latent norms `q_a_layernorm` / `kv_a_layernorm` belong to `q_low_rank` / `kv_low_rank`: they sit between the
down- and up-projection of those paths, so "train the MLA low-rank paths" trains them too (under `lora`, only
the Linear layers get adapters and the norms stay frozen).

A group asked to train that matches nothing is an error (or, with `policy.on_missing=skip`, a recorded
warning) whose message says what the checkpoint has and which preset fits. Groups marked `required: false`
(e.g. `q_low_rank` in `mla_lowrank`: released checkpoints have no q low-rank path) are trained where present.
"""

from __future__ import annotations

import json
import logging
import re

import torch
from torch import nn

from ..model.quant import quantized_weights
from .config import GROUP_NAMES, MODES, GroupPolicy, PolicyConfig, PolicyGroups
from .lora import _lora_config, _use_low_rank_expert_lora
from .report import GroupReport, PolicyReport

_L = r"^language\.model\.layers\.\d+\."
_ATTN = _L + r"self_attn\."
# (group, pattern on the parameter name with PEFT's wrapper segments removed). Order matters only for clarity:
# the patterns are disjoint, which tests check.
GROUPS: list[tuple[str, re.Pattern]] = [
    ("vision", re.compile(r"^vision\.")),
    ("projector", re.compile(r"^projector\.")),
    ("view_tokens", re.compile(r"^(image_newline|view_seperator)$")),
    ("embed_tokens", re.compile(r"^language\.model\.embed_tokens\.")),
    ("lm_head", re.compile(r"^language\.lm_head\.")),
    ("norms", re.compile(r"^language\.model\.norm\.|" + _L + r"(input_layernorm|post_attention_layernorm)\.")),
    ("q_low_rank", re.compile(_ATTN + r"(q_a_proj|q_a_layernorm|q_b_proj)\.")),
    ("kv_low_rank", re.compile(_ATTN + r"(kv_a_proj_with_mqa|kv_a_layernorm|kv_b_proj)\.")),
    ("q_proj", re.compile(_ATTN + r"q_proj\.")),  # MLA full-rank query (MHA's q_proj goes to mha_qkv)
    ("mha_qkv", re.compile(_ATTN + r"(q_proj|k_proj|v_proj)\.")),
    ("o_proj", re.compile(_ATTN + r"o_proj\.")),
    ("mlp_dense", re.compile(_L + r"mlp\.(gate_proj|up_proj|down_proj)\.")),
    ("shared_experts", re.compile(_L + r"mlp\.shared_experts\.")),
    ("routed_experts", re.compile(_L + r"mlp\.experts\.")),
    ("router", re.compile(_L + r"mlp\.gate\.(weight|e_score_correction_bias)$")),
]
GROUP_MODULES = {  # for messages: what each group means
    "q_low_rank": "q_a_proj/q_a_layernorm/q_b_proj",
    "kv_low_rank": "kv_a_proj_with_mqa/kv_a_layernorm/kv_b_proj",
    "q_proj": "MLA q_proj",
    "mha_qkv": "MHA q_proj/k_proj/v_proj",
}
_PEFT_SEGMENT = re.compile(r"\.(base_layer|lora_[AB]\.\w+|lora_magnitude_vector\.\w+|lora_embedding_[AB]\.\w+)(?=\.|$)")
_LAYER = re.compile(r"^language\.model\.layers\.(\d+)\.")
log = logging.getLogger(__name__)


class PolicyError(ValueError):
    """The policy does not fit the checkpoint; raised before any compute."""


def base_name(name: str) -> str:
    """A parameter name with PEFT's wrapper segments removed (`o_proj.base_layer.weight` -> `o_proj.weight`)."""
    return _PEFT_SEGMENT.sub("", name)


def group_of(name: str, use_mla: bool) -> str:
    base = base_name(name)
    for group, pattern in GROUPS:
        if pattern.search(base) and not (group == "q_proj" and not use_mla) and not (group == "mha_qkv" and use_mla):
            return group
    raise KeyError(f"parameter {name!r} belongs to no policy group")


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def to_policy_config(cfg) -> PolicyConfig:
    """PolicyConfig from a PolicyConfig, a DictConfig (Hydra) or a plain dict; unknown keys are errors."""
    if isinstance(cfg, PolicyConfig):
        return cfg
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # the model side (bench, GPU tests) also runs where Hydra is not installed
        DictConfig = None
    if DictConfig is not None and isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg = dict(cfg)
    groups = cfg.pop("groups", {}) or {}
    unknown = set(groups) - set(GROUP_NAMES)
    if unknown:
        raise PolicyError(f"unknown policy group(s) {sorted(unknown)}; groups are: {', '.join(GROUP_NAMES)}")
    built = {}
    for g, spec in groups.items():
        try:
            built[g] = GroupPolicy(**(spec or {}))
        except TypeError as e:
            raise PolicyError(f"policy group {g}: {e}") from None
    return PolicyConfig(**cfg, groups=PolicyGroups(**built))


# ------------------------------------------------------------------------------------------- resolution
def _checkpoint_summary(model) -> str:
    lm = model.config.language
    if not lm.use_mla:
        return (
            "this is an MHA checkpoint (use_mla: false, like VL2-Tiny): attention is q_proj/k_proj/v_proj/o_proj, "
            "there are no MLA low-rank paths"
        )
    q = (
        f"q_a_proj/q_b_proj (q_lora_rank={lm.q_lora_rank})"
        if lm.q_lora_rank
        else "a full-rank q_proj (q_lora_rank: null)"
    )
    return f"this is an MLA checkpoint with kv_a_proj_with_mqa/kv_b_proj (kv_lora_rank={lm.kv_lora_rank}) and {q}"


def _fit_hint(model, group: str) -> str:
    if not model.config.language.use_mla and group in ("q_low_rank", "kv_low_rank", "q_proj"):
        return "use policy=mha_lora (LoRA on q/k/v/o) or policy=full_lm"
    if group == "q_low_rank":
        return "set policy.groups.q_low_rank.mode=freeze (or required=false), or policy.on_missing=skip"
    if group == "mha_qkv":
        return "on MLA checkpoints use policy=mla_lowrank or policy=mla_lowrank_lora"
    return f"set policy.groups.{group}.mode=freeze or policy.on_missing=skip"


def resolve_groups(model: nn.Module, cfg: PolicyConfig) -> dict[str, list[str]]:
    """group -> parameter names it covers (honouring `layers`), for the model as it is now; a quantized weight
    (model/quant.py) counts under the name of the parameter it replaces."""
    use_mla = model.config.language.use_mla
    out: dict[str, list[str]] = {g: [] for g in GROUP_NAMES}
    names = [n for n, _ in model.named_parameters()] + list(quantized_weights(model))
    for name in names:
        g = group_of(name, use_mla)
        layers = getattr(cfg.groups, g).layers
        if layers is not None and layer_of(name) not in set(layers):
            continue
        out[g].append(name)
    return out


def _check_config(cfg: PolicyConfig) -> None:
    if cfg.on_missing not in ("error", "skip"):
        raise PolicyError(f"policy.on_missing={cfg.on_missing!r}: expected error or skip")
    lora = [(g, getattr(cfg.groups, g)) for g in GROUP_NAMES if getattr(cfg.groups, g).mode == "lora"]
    for g in GROUP_NAMES:
        spec = getattr(cfg.groups, g)
        if spec.mode not in MODES:
            raise PolicyError(f"policy.groups.{g}.mode={spec.mode!r}: expected one of {MODES}")
        if spec.layers is not None and g in ("vision", "projector", "view_tokens", "embed_tokens", "lm_head"):
            raise PolicyError(f"policy.groups.{g}.layers: only decoder-layer groups can be restricted to layers")
    routed = cfg.groups.routed_experts
    if routed.mode == "lora" and (routed.dora or routed.dropout):
        raise PolicyError(
            "policy.groups.routed_experts: LoRA on the stacked expert tensors (PEFT parameter targeting) supports "
            "neither dora nor dropout; set them off, or train routed_experts in full"
        )
    shared = {(s.dropout, s.rslora, s.dora, s.init) for _, s in lora}
    if len(shared) > 1:
        raise PolicyError(
            "LoRA groups must share dropout, rslora, dora and init (one PEFT adapter); got "
            + "; ".join(f"{g}: dropout={s.dropout} rslora={s.rslora} dora={s.dora} init={s.init}" for g, s in lora)
        )


def apply_policy(model: nn.Module, cfg) -> PolicyReport:
    """Freeze everything, add LoRA adapters and unfreeze trained groups as the policy says; report it.

    Raises PolicyError before any compute if the policy does not fit the checkpoint.
    """
    cfg = to_policy_config(cfg)
    _check_config(cfg)
    use_mla = model.config.language.use_mla
    matched = resolve_groups(model, cfg)
    warnings, missing = [], []
    for g in GROUP_NAMES:
        spec = getattr(cfg.groups, g)
        if spec.mode != "freeze" and not matched[g] and spec.required:
            what = GROUP_MODULES.get(g, g)
            missing.append(f"group {g} ({what}) is set to {spec.mode} but matches nothing: {_fit_hint(model, g)}")
    if missing and cfg.on_missing == "error":
        raise PolicyError(f"policy {cfg.name}: " + "; ".join(missing) + f". ({_checkpoint_summary(model)})")
    warnings += missing

    _check_quantized(model, cfg, matched)
    model.requires_grad_(False)
    lora_cfg = _lora_config(model, cfg, matched)
    if lora_cfg is not None:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(lora_cfg, model, adapter_name="default")
        _use_low_rank_expert_lora(model)
    for g in GROUP_NAMES:
        if getattr(cfg.groups, g).mode == "train":
            for name in matched[g]:
                model.get_parameter(name).requires_grad_(True)
    model.policy_config = cfg  # what was applied, for saving trained state

    report = _report(model, cfg, use_mla, warnings, lora_cfg)
    if report.trainable_params == 0:
        raise PolicyError(
            f"policy {cfg.name} trains nothing on this checkpoint ({_checkpoint_summary(model)}); "
            + ("use policy=mha_lora" if not use_mla else "use policy=mla_lowrank")
        )
    return report


def _report(model, cfg, use_mla, warnings, lora_cfg) -> PolicyReport:
    rows = {g: GroupReport(g, getattr(cfg.groups, g).mode) for g in GROUP_NAMES}
    modules: dict[str, set] = {g: set() for g in GROUP_NAMES}
    trainable_names, total, trainable = [], 0, 0
    quantized = quantized_weights(model)
    kinds: dict[str, set] = {g: set() for g in GROUP_NAMES}
    for name, q in quantized.items():  # frozen, stored quantized: in their group's params and in the total
        g = group_of(name, use_mla)
        rows[g].params += q.numel()
        total += q.numel()
        modules[g].add(base_name(name).rsplit(".", 1)[0])
        kinds[g].add(q.kind)
    for name, p in model.named_parameters():  # adapters count in their group's params and in the total
        g = group_of(name, use_mla)
        rows[g].params += p.numel()
        total += p.numel()
        if "lora_" not in name:
            modules[g].add(base_name(name).rsplit(".", 1)[0])
        if p.requires_grad:
            rows[g].trainable += p.numel()
            trainable += p.numel()
            trainable_names.append(name)
    for g, row in rows.items():
        row.modules = len(modules[g])
        spec = getattr(cfg.groups, g)
        if spec.layers is not None:
            row.note = f"layers {spec.layers}"
        if row.mode == "lora":
            row.note = (row.note + f" r={spec.r} alpha={spec.alpha}").strip()
        if kinds[g]:
            row.note = (row.note + " base " + "/".join(sorted(kinds[g]))).strip()
        if row.mode != "freeze" and row.params == 0:
            row.note = (row.note + (" not in this checkpoint" if not spec.required else " MATCHES NOTHING")).strip()
    lora = lora_cfg.to_dict() if lora_cfg is not None else None
    if lora:
        lora = json.loads(json.dumps(lora, default=str))
    return PolicyReport(
        cfg.name,
        [r for r in rows.values() if r.params or r.mode != "freeze"],
        trainable_names,
        total,
        trainable,
        warnings,
        lora,
    )


def _check_quantized(model: nn.Module, cfg: PolicyConfig, matched: dict[str, list[str]]) -> None:
    """A group trained in full cannot have quantized weights, nor can LoRA that reads its base weight (DoRA, PiSSA,
    OLoRA, ... inits); one-line PolicyError naming the group and the fix."""
    stored = quantized_weights(model)
    for g in GROUP_NAMES:
        spec = getattr(cfg.groups, g)
        hit = [n for n in matched[g] if n in stored]
        if not hit or spec.mode == "freeze":
            continue
        kind = stored[hit[0]].kind
        if spec.mode == "train":
            raise PolicyError(
                f"policy {cfg.name} trains group {g} in full, but its weights are stored quantized ({kind}, "
                f"e.g. {hit[0]}): freeze it, give it LoRA (policy.groups.{g}.mode=lora) or set model.quantize=none"
            )
        if spec.dora or spec.init not in ("default", "gaussian"):
            raise PolicyError(
                f"policy.groups.{g}: LoRA with dora={spec.dora} init={spec.init} reads the base weight, which is "
                f"quantized ({kind}): use plain LoRA (dora=false, init default or gaussian) or model.quantize=none"
            )


# ------------------------------------------------------------------------------------------- optimisation
def optimizer_param_groups(model: nn.Module, cfg=None, lr: float = 1e-4, weight_decay: float = 0.0) -> list[dict]:
    """AdamW groups: one per policy group with trainable parameters, lr × the group's lr_scale; no weight decay on
    vectors (norms, biases, correction bias). Frozen parameters never reach the optimizer."""
    cfg = to_policy_config(cfg if cfg is not None else model.policy_config)
    use_mla = model.config.language.use_mla
    buckets: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets.setdefault((group_of(name, use_mla), p.dim() > 1), []).append(p)
    return [
        {
            "name": f"{g}{'' if decay else '/no_decay'}",
            "params": params,
            "lr": lr * getattr(cfg.groups, g).lr_scale,
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (g, decay), params in buckets.items()
    ]


def load_trainable_state_dict(
    model: nn.Module, state: dict[str, torch.Tensor], source: str = "state", assign: bool = False
) -> None:
    """Copy trainable tensors in (`assign`: put them in place of the parameters, e.g. of a model on the meta
    device); the names must be exactly the model's trainable set."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or unexpected:
        raise ValueError(
            f"{source}: trainable tensors do not match the policy: missing {sorted(missing)[:10]}, "
            f"unexpected {sorted(unexpected)[:10]}"
        )
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != state[n].shape:
                raise ValueError(f"{source}: {n} has shape {tuple(state[n].shape)}, model has {tuple(p.shape)}")
            if assign:
                owner, _, leaf = n.rpartition(".")
                setattr(model.get_submodule(owner) if owner else model, leaf, nn.Parameter(state[n]))
            else:
                p.copy_(state[n])
