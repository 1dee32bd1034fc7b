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

import dataclasses
import json
import re
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .policy_config import GROUP_NAMES, MODES, GroupPolicy, PolicyConfig, PolicyGroups

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


@dataclass
class GroupReport:
    group: str
    mode: str
    modules: int = 0
    params: int = 0
    trainable: int = 0
    note: str = ""


@dataclass
class PolicyReport:
    policy: str
    groups: list[GroupReport]
    trainable_names: list[str]
    total_params: int
    trainable_params: int
    warnings: list[str] = field(default_factory=list)
    lora: dict | None = None

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def table(self) -> str:
        rows = [("group", "mode", "modules", "params", "trainable", "note")]
        for g in self.groups:
            rows.append((g.group, g.mode, str(g.modules), f"{g.params:,}", f"{g.trainable:,}", g.note))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [
            "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + "  " + r[5]
            for r in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(
            f"policy {self.policy}: trainable {self.trainable_params:,} / {self.total_params:,} ({self.percent:.4f}%)"
        )
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["percent"] = self.percent
        return d

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


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
    """group -> parameter names it covers (honouring `layers`), for the model as it is now."""
    use_mla = model.config.language.use_mla
    out: dict[str, list[str]] = {g: [] for g in GROUP_NAMES}
    for name, _ in model.named_parameters():
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


def _lora_config(model, cfg: PolicyConfig, matched: dict[str, list[str]]):
    """One PEFT LoraConfig: nn.Linear targets by exact module name, stacked experts by parameter name."""
    from peft import LoraConfig

    modules, params, rank_pattern, alpha_pattern = [], [], {}, {}
    spec0 = None
    for g in GROUP_NAMES:
        spec = getattr(cfg.groups, g)
        if spec.mode != "lora":
            continue
        spec0 = spec
        for name in matched[g]:
            owner_name, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            owner = model.get_submodule(owner_name) if owner_name else model
            if isinstance(owner, nn.Linear) and leaf == "weight":
                target, bucket = owner_name, modules
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
    return LoraConfig(
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

    from .moe import RoutedExperts

    for module in model.modules():
        if isinstance(module, ParamWrapper) and isinstance(module.get_base_layer(), RoutedExperts):
            module.forward = types.MethodType(_low_rank_expert_forward, module)


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


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "state") -> None:
    """Copy trainable tensors in; the names must be exactly the model's trainable set."""
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
            p.copy_(state[n])


# ------------------------------------------------------------------------------------------- trained state
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
TRAINED_TENSORS, POLICY_FILE = "trained_tensors.safetensors", "policy.json"


def save_trained_state(model: nn.Module, out_dir: str | Path) -> Path:
    """A small directory: PEFT adapter (config + safetensors), fully trained tensors, and the policy. Atomic."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from .checkpoint import replace_dir

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        trained = {
            base_name(n): t.contiguous().cpu() for n, t in trainable_state_dict(model).items() if "lora_" not in n
        }
        save_file(trained, str(tmp / TRAINED_TENSORS), metadata={"format": "pt"})
        if getattr(model, "peft_config", None):
            from peft import get_peft_model_state_dict

            adapter = {
                k: v.contiguous().cpu() for k, v in get_peft_model_state_dict(model, adapter_name="default").items()
            }
            save_file(adapter, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            model.peft_config["default"].save_pretrained(str(tmp))
        policy = dataclasses.asdict(model.policy_config)
        (tmp / POLICY_FILE).write_text(json.dumps(policy, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_trained_state(
    model: nn.Module, trained_dir: str | Path, trainable_dtype: torch.dtype | None = None
) -> PolicyReport:
    """Re-apply the saved policy to a base model and load the adapter and trained tensors: the trained model.

    `trainable_dtype` (e.g. torch.float32 under bf16 storage, as the training loop keeps its master weights)
    casts the policy's trainable parameters before the saved values are copied in, so they are not rounded to
    the storage dtype."""
    from safetensors.torch import load_file

    trained_dir = Path(trained_dir)
    if not (trained_dir / POLICY_FILE).exists():
        raise FileNotFoundError(f"{trained_dir}: no {POLICY_FILE}; not a trained-state directory")
    report = apply_policy(model, json.loads((trained_dir / POLICY_FILE).read_text()))
    if trainable_dtype is not None:
        for p in model.parameters():
            if p.requires_grad and p.dtype != trainable_dtype:
                p.data = p.data.to(trainable_dtype)
    if (trained_dir / ADAPTER_WEIGHTS).exists():
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(trained_dir / ADAPTER_WEIGHTS), adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{trained_dir / ADAPTER_WEIGHTS}: unexpected keys {result.unexpected_keys[:10]}")
    by_base = {base_name(n): n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    tensors = load_file(trained_dir / TRAINED_TENSORS)
    if tensors.keys() != by_base.keys():
        raise ValueError(
            f"{trained_dir / TRAINED_TENSORS}: tensors {sorted(tensors.keys() ^ by_base.keys())[:10]} "
            "do not match the trained set of the saved policy"
        )
    with torch.no_grad():
        for b, n in by_base.items():
            model.get_parameter(n).copy_(tensors[b])
    return report


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weight and remove the wrappers (PEFT layers, one level at a time,
    since stacked-expert targets nest)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

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
