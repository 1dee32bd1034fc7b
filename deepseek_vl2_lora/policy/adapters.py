"""The trained state (`<run dir>/trained`): a stock PEFT adapter directory (LoRA factors and the fully trained modules),
`policy.json`, `base_model.json` (the base as a Hub id and as the local directory training read) and
`trained_tensors.safetensors` for trained parameters PEFT cannot hold; reading it back onto a base model. A stock PEFT
LoRA adapter for this architecture (no policy.json) reads the same way, its policy derived from its targets
(`foreign.py`)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import nn

from .groups import apply_policy, base_name
from .report import PolicyReport

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- trained state
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
TRAINED_TENSORS, POLICY_FILE = "trained_tensors.safetensors", "policy.json"
# The base checkpoint: {"hub_id": ..., "local_path": ...}. adapter_config.json's base_model_name_or_path holds the
# Hub id when there is one (portable), else the local path; the local path is kept here, not as an extra key of
# adapter_config.json, which stock PEFT would load with a warning to upgrade PEFT.
BASE_MODEL_FILE = "base_model.json"
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


def hub_id_of(checkpoint_dir: str | Path | None) -> str | None:
    """The Hub id a checkpoint's config.json names (`_name_or_path` of the form org/name, as transformers writes
    it), else None."""
    if checkpoint_dir is None or not (Path(checkpoint_dir) / "config.json").is_file():
        return None
    try:
        name = json.loads((Path(checkpoint_dir) / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    looks_like_id = isinstance(name, str) and name.count("/") == 1 and not name.startswith((".", "/", "~"))
    return name if looks_like_id and not Path(name).exists() else None


def _adapter_config(model: nn.Module, modules_to_save: list[str], base_model: str | None):
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
    config.base_model_name_or_path = base_model
    config.inference_mode = True
    return config


def save_trained_state(
    model: nn.Module, out_dir: str | Path, base_model: str | Path | None = None, hub_id: str | None = None
) -> Path:
    """A standard PEFT adapter directory (atomic): `adapter_config.json` (LoRA targets, `modules_to_save`,
    `base_model_name_or_path` = the Hub id of `base_model` (`hub_id`, else the one its config.json names), else its
    local path) and `adapter_model.safetensors` under PEFT's own key names (LoRA factors, and the fully trained
    modules' tensors); `peft.PeftModel.from_pretrained` on the base model gives the trained model. Beside them
    `policy.json` (the policy, for `load_trained_state`), `base_model.json` (Hub id and local path, when known)
    and, only for trained parameters PEFT cannot hold (see `peft_modules_to_save`), `trained_tensors.safetensors`."""
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
        local = str(Path(base_model).resolve()) if base_model is not None and Path(base_model).is_dir() else None
        hub_id = hub_id or hub_id_of(base_model)
        name = hub_id or local or (str(base_model) if base_model is not None else None)
        _adapter_config(model, modules, name).save_pretrained(str(tmp))
        if hub_id or local:
            base_info = {"hub_id": hub_id, "local_path": local}
            (tmp / BASE_MODEL_FILE).write_text(json.dumps(base_info, indent=2) + "\n")
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


def is_trained_dir(path: str | Path) -> bool:
    """A trained-state directory (policy.json) or a stock PEFT adapter (adapter_config.json)."""
    return (Path(path) / POLICY_FILE).is_file() or (Path(path) / ADAPTER_CONFIG).is_file()


def resolve_trained_dir(path: str | Path) -> Path:
    """A trained-state directory (or a stock PEFT adapter) given itself or its run directory (`RUN/trained`); else a
    one-line error."""
    p = Path(path).expanduser()
    if (p / RUN_CONFIG_FILE).is_file() and (p / "trained").is_dir():
        p = p / "trained"
    if is_trained_dir(p):
        return p
    raise FileNotFoundError(
        f"{p}: not a trained-state directory ({POLICY_FILE}), a PEFT adapter ({ADAPTER_CONFIG}) or a run directory "
        "with trained/"
    )


def trained_base(trained_dir: Path) -> tuple[Path | None, str | None]:
    """(the local base checkpoint dir when it is here, the name the adapter gives its base) of a trained dir: the
    local path of base_model.json, else base_model_name_or_path when that is a local checkpoint dir."""
    info = json.loads((trained_dir / BASE_MODEL_FILE).read_text()) if (trained_dir / BASE_MODEL_FILE).is_file() else {}
    config = json.loads((trained_dir / ADAPTER_CONFIG).read_text()) if (trained_dir / ADAPTER_CONFIG).is_file() else {}
    name = config.get("base_model_name_or_path") or info.get("local_path")
    for candidate in (info.get("local_path"), config.get("base_model_name_or_path")):
        if candidate and (Path(candidate).expanduser() / "config.json").is_file():
            return Path(candidate).expanduser(), name
    return None, name


def resolve_trained_model(path: str | Path) -> tuple[Path, Path | None]:
    """(base checkpoint dir, trained-state dir or None) for what a trained model is asked for by: a checkpoint dir
    (a base or a merged one: no trained state), a run dir or a trained-state dir (the base is the local checkpoint
    training loaded, or the adapter's `base_model_name_or_path` when that is a local dir). A one-line error
    otherwise."""
    p = Path(path).expanduser()
    if (p / "config.json").is_file():
        return p, None
    trained = resolve_trained_dir(p)
    base, name = trained_base(trained)
    if base is None:
        raise FileNotFoundError(
            f"{trained}: its base checkpoint ({name!r}) is not a local checkpoint directory here; pass the base "
            "checkpoint dir and this trained dir separately"
        )
    return base, trained


def is_lora_key(name: str) -> bool:
    """A LoRA tensor's name (PEFT's adapter layers), as opposed to a fully trained module's."""
    return any(f".{part}" in name for part in ("lora_A.", "lora_B.", "lora_magnitude_vector", "lora_embedding_"))


def read_trained_state(trained_dir: str | Path) -> tuple[dict, dict]:
    """(LoRA tensors under PEFT's names without the PeftModel prefix, fully trained tensors by parameter name) of a
    trained-state directory or a stock PEFT adapter, in this format or the previous one (LoRA keys without prefix,
    everything trained in full in trained_tensors.safetensors)."""
    from safetensors.torch import load_file

    trained_dir = resolve_trained_dir(trained_dir)
    lora, full = {}, {}
    if (trained_dir / ADAPTER_WEIGHTS).exists():
        for k, v in load_file(trained_dir / ADAPTER_WEIGHTS).items():
            (lora if is_lora_key(k) else full)[k.removeprefix(PEFT_PREFIX)] = v
    if (trained_dir / TRAINED_TENSORS).exists():
        full.update(load_file(trained_dir / TRAINED_TENSORS))
    return lora, full


def trained_policy(trained_dir: str | Path, config):
    """The policy of a trained dir (policy.json, or its run dir's), or the one a stock PEFT adapter's targets map onto
    on the architecture `config` (a VL2Config) describes (foreign.py)."""
    trained_dir = resolve_trained_dir(trained_dir)
    if (trained_dir / POLICY_FILE).is_file():
        return json.loads((trained_dir / POLICY_FILE).read_text())
    from .foreign import policy_from_adapter

    return policy_from_adapter(config, trained_dir / ADAPTER_CONFIG)


def load_lora_tensors(model: nn.Module, lora: dict, where: Path) -> None:
    """Put an adapter's LoRA tensors into the PEFT layers the policy injected (adapter layers still on the meta
    device, as on a model built there, get real storage first); every LoRA tensor must fit exactly."""
    if not getattr(model, "peft_config", None):
        if lora:
            raise ValueError(f"{where / ADAPTER_WEIGHTS}: LoRA tensors {sorted(lora)[:10]}, the policy has no LoRA")
        return
    from peft import set_peft_model_state_dict

    for name, module in model.named_modules():
        if is_lora_key(name + ".") and any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
    result = set_peft_model_state_dict(model, lora, adapter_name="default")
    missing = [k for k in result.missing_keys if is_lora_key(k)]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"{where / ADAPTER_WEIGHTS}: LoRA tensors do not match the saved policy: missing {missing[:10]}, "
            f"unexpected {result.unexpected_keys[:10]}"
        )


def check_full_tensors(model: nn.Module, full: dict, where: Path) -> dict[str, str]:
    """{trained tensor name: the model's parameter or buffer name}; the names must be exactly the policy's trained
    set (a one-line error naming the difference)."""
    by_base = {base_name(n): n for n, p in model.named_parameters() if p.requires_grad and not is_lora_key(n)}
    buffers = {n: n for n, _ in model.named_buffers()}
    unexpected, missing = full.keys() - by_base.keys() - buffers.keys(), by_base.keys() - full.keys()
    if unexpected or missing:
        raise ValueError(
            f"{where}: trained tensors do not match the trained set of the saved policy: missing "
            f"{sorted(missing)[:10]}, unexpected {sorted(unexpected)[:10]}"
        )
    return {name: by_base.get(name, name) for name in full}


def load_trained_state(
    model: nn.Module, trained_dir: str | Path, trainable_dtype: torch.dtype | None = None
) -> PolicyReport:
    """Re-apply the saved policy to a base model and load the adapter and trained tensors: the trained model (in
    the training structure: our low-rank routed-expert forward, trainable parameters as the policy sets them).
    `trained_dir` may be a run directory, or a stock PEFT LoRA adapter whose targets map onto policy groups.

    `trainable_dtype` (e.g. torch.float32 under bf16 storage, as the training loop keeps its master weights)
    casts the policy's trainable parameters before the saved values are copied in, so they are not rounded to
    the storage dtype."""
    trained_dir = resolve_trained_dir(trained_dir)
    report = apply_policy(model, trained_policy(trained_dir, model.config))
    if trainable_dtype is not None:
        for p in model.parameters():
            if p.requires_grad and p.dtype != trainable_dtype:
                p.data = p.data.to(trainable_dtype)
    load_trained_tensors(model, trained_dir)
    return report


def load_trained_tensors(model: nn.Module, trained_dir: str | Path) -> None:
    """Copy a trained dir's LoRA factors and trained tensors into a model its policy is applied to."""
    trained_dir = resolve_trained_dir(trained_dir)
    lora, full = read_trained_state(trained_dir)
    load_lora_tensors(model, lora, trained_dir)
    targets = check_full_tensors(model, full, trained_dir)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in full.items():
            target = targets[name]
            (params[target] if target in params else model.get_buffer(target)).copy_(t)
