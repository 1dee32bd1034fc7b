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
import logging
import re
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import GROUP_NAMES, MODES, GroupPolicy, PolicyConfig, PolicyGroups

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

    from ..model.moe import RoutedExperts

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
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the base model's names in an adapter file
RUN_CONFIG_FILE = "config_resolved.yaml"


def peft_modules_to_save(model: nn.Module) -> tuple[list[str], list[str]]:
    """(modules whose every parameter trains in full, for PEFT's `modules_to_save`; fully trained parameters that
    no such module holds). The modules are the parameters' own (Linear, RMSNorm, Embedding, Router, RoutedExperts),
    by full name, so PEFT's suffix match finds exactly them. A parameter held directly by the top-level model
    (`image_newline`/`view_seperator`, group view_tokens) has no module PEFT can wrap."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    containers = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict, BaseTunerLayer)
    modules: list[str] = []
    rest: list[str] = []
    for name, p in model.named_parameters():
        if not p.requires_grad or "lora_" in name:
            continue
        owner_name = name.rpartition(".")[0]
        owner = model.get_submodule(owner_name) if owner_name else None
        whole = (
            owner is not None
            and base_name(name) == name  # not inside a PEFT wrapper
            and not isinstance(owner, containers)
            and all(q.requires_grad for q in owner.parameters())
        )
        if not whole:
            rest.append(name)
        elif owner_name not in modules:
            modules.append(owner_name)
    # A module inside another one to save is saved with it (PEFT must not wrap twice); PEFT matches by name suffix,
    # so a name that is the suffix of another module's name would wrap that one too.
    modules = [m for m in modules if not any(m.startswith(f"{o}.") for o in modules)]
    names = [n for n, _ in model.named_modules()]
    ambiguous = {m for m in modules if sum(n.endswith(m) for n in names) > 1}
    rest += [n for n, p in model.named_parameters() if p.requires_grad and n.rpartition(".")[0] in ambiguous]
    return [m for m in modules if m not in ambiguous], rest


def _adapter_config(model: nn.Module, modules_to_save: list[str], base_model):
    """The PEFT config written beside the weights: the training LoRA config (or a LoRA config with PEFT's dummy
    target when the policy has no LoRA) plus modules_to_save and the base checkpoint."""
    import copy

    from peft import LoraConfig
    from peft.utils.constants import DUMMY_TARGET_MODULES

    if getattr(model, "peft_config", None):
        config = copy.deepcopy(model.peft_config["default"])
    else:
        config = LoraConfig(target_modules=DUMMY_TARGET_MODULES, bias="none")
    config.modules_to_save = modules_to_save or None
    if base_model is not None and Path(base_model).is_dir():
        base_model = Path(base_model).resolve()  # the run dir may be read from elsewhere
    config.base_model_name_or_path = str(base_model) if base_model is not None else None
    config.inference_mode = True
    return config


def save_trained_state(model: nn.Module, out_dir: str | Path, base_model: str | Path | None = None) -> Path:
    """A standard PEFT adapter directory (atomic): `adapter_config.json` (LoRA targets, `modules_to_save`,
    `base_model_name_or_path` = `base_model`) and `adapter_model.safetensors` under PEFT's own key names (LoRA
    factors, and the fully trained modules' tensors); `peft.PeftModel.from_pretrained` on the base model gives the
    trained model. Beside them `policy.json` (the policy, for `load_trained_state`) and, only for trained parameters
    PEFT cannot hold (see `peft_modules_to_save`), `trained_tensors.safetensors`."""
    import shutil

    from ..model.checkpoint import make_temp_dir, replace_dir, save_safetensors

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out_dir.parent, f".{out_dir.name}.tmp-")
    try:
        modules, rest = peft_modules_to_save(model)
        adapter = {}
        if getattr(model, "peft_config", None):
            from peft import get_peft_model_state_dict

            lora = get_peft_model_state_dict(model, adapter_name="default")
            adapter.update({PEFT_PREFIX + k: v for k, v in lora.items()})
        for m in modules:  # PEFT saves a module to save under its plain names (adapter_state_dict_load_map)
            adapter.update({f"{PEFT_PREFIX}{m}.{k}": v for k, v in model.get_submodule(m).state_dict().items()})
        save_safetensors({k: v.contiguous().cpu() for k, v in adapter.items()}, tmp / ADAPTER_WEIGHTS, {"format": "pt"})
        _adapter_config(model, modules, base_model).save_pretrained(str(tmp))
        if rest:
            log.warning(
                "trained parameters %s belong to no module PEFT can save whole; they are in %s, which "
                "load_trained_state reads and stock PEFT does not",
                rest,
                TRAINED_TENSORS,
            )
            tensors = {n: model.get_parameter(n).detach().contiguous().cpu() for n in rest}
            save_safetensors({base_name(n): t for n, t in tensors.items()}, tmp / TRAINED_TENSORS, {"format": "pt"})
        policy = dataclasses.asdict(model.policy_config)
        (tmp / POLICY_FILE).write_text(json.dumps(policy, indent=2) + "\n")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_trained_dir(path: str | Path) -> Path:
    """A trained-state directory given itself or its run directory (`RUN/trained`); else a one-line error."""
    p = Path(path).expanduser()
    if (p / RUN_CONFIG_FILE).is_file() and (p / "trained").is_dir():
        p = p / "trained"
    if (p / POLICY_FILE).is_file():
        return p
    if (p / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(
            f"{p}: a PEFT adapter without {POLICY_FILE} (not written by this repo's training); load it with "
            "peft.PeftModel.from_pretrained(DeepseekVL2ForCausalLM.from_pretrained(base), dir)"
        )
    raise FileNotFoundError(f"{p}: not a trained-state directory ({POLICY_FILE}) or a run directory with trained/")


def resolve_trained_model(path: str | Path) -> tuple[Path, Path | None]:
    """(base checkpoint dir, trained-state dir or None) for what a trained model is asked for by: a checkpoint dir
    (a base or a merged one: no trained state), a run dir or a trained-state dir (the base is the adapter's
    `base_model_name_or_path`, the checkpoint training loaded). A one-line error otherwise."""
    p = Path(path).expanduser()
    if (p / "config.json").is_file():
        return p, None
    trained = resolve_trained_dir(p)
    config = json.loads((trained / ADAPTER_CONFIG).read_text()) if (trained / ADAPTER_CONFIG).is_file() else {}
    base = config.get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(
            f"{trained}: the base checkpoint ({ADAPTER_CONFIG} base_model_name_or_path={base!r}) is not here; "
            "pass the base checkpoint dir and this trained dir separately"
        )
    return Path(base), trained


def read_trained_state(trained_dir: str | Path) -> tuple[dict, dict]:
    """(LoRA tensors under PEFT's names without the PeftModel prefix, fully trained tensors by parameter name) of a
    trained-state directory, in this format or the previous one (LoRA keys without prefix, everything trained in
    full in trained_tensors.safetensors)."""
    from safetensors.torch import load_file

    trained_dir = resolve_trained_dir(trained_dir)
    lora, full = {}, {}
    if (trained_dir / ADAPTER_WEIGHTS).exists():
        config = json.loads((trained_dir / ADAPTER_CONFIG).read_text())
        prefixes = tuple(f"{PEFT_PREFIX}{m}." for m in config.get("modules_to_save") or [])
        for k, v in load_file(trained_dir / ADAPTER_WEIGHTS).items():
            if k.startswith(prefixes):
                full[k.removeprefix(PEFT_PREFIX)] = v
            else:
                lora[k.removeprefix(PEFT_PREFIX)] = v
    if (trained_dir / TRAINED_TENSORS).exists():
        full.update(load_file(trained_dir / TRAINED_TENSORS))
    return lora, full


def load_trained_state(
    model: nn.Module, trained_dir: str | Path, trainable_dtype: torch.dtype | None = None
) -> PolicyReport:
    """Re-apply the saved policy to a base model and load the adapter and trained tensors: the trained model (in
    the training structure: our low-rank routed-expert forward, trainable parameters as the policy sets them).
    `trained_dir` may be a run directory.

    `trainable_dtype` (e.g. torch.float32 under bf16 storage, as the training loop keeps its master weights)
    casts the policy's trainable parameters before the saved values are copied in, so they are not rounded to
    the storage dtype."""
    trained_dir = resolve_trained_dir(trained_dir)
    report = apply_policy(model, json.loads((trained_dir / POLICY_FILE).read_text()))
    if trainable_dtype is not None:
        for p in model.parameters():
            if p.requires_grad and p.dtype != trainable_dtype:
                p.data = p.data.to(trainable_dtype)
    lora, full = read_trained_state(trained_dir)
    if getattr(model, "peft_config", None):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, lora, adapter_name="default")
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            raise ValueError(
                f"{trained_dir / ADAPTER_WEIGHTS}: LoRA tensors do not match the saved policy: missing {missing[:10]}, "
                f"unexpected {result.unexpected_keys[:10]}"
            )
    elif lora:
        raise ValueError(f"{trained_dir / ADAPTER_WEIGHTS}: LoRA tensors {sorted(lora)[:10]}, the policy has no LoRA")
    by_base = {base_name(n): n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    buffers = dict(model.named_buffers())
    unexpected, missing = full.keys() - by_base.keys() - buffers.keys(), by_base.keys() - full.keys()
    if unexpected or missing:
        raise ValueError(
            f"{trained_dir}: trained tensors do not match the trained set of the saved policy: missing "
            f"{sorted(missing)[:10]}, unexpected {sorted(unexpected)[:10]}"
        )
    with torch.no_grad():
        for name, t in full.items():
            (model.get_parameter(by_base[name]) if name in by_base else buffers[name]).copy_(t)
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
