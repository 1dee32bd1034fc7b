"""Merge a trained-state directory (or a run dir, or a stock PEFT LoRA adapter) into its base checkpoint: a full
checkpoint in the official layout, written one base shard at a time.

The model is built on the meta device (no weights) with the policy applied; only the adapter and the fully
trained tensors are real. Each base shard is opened in turn (safetensors `safe_open`) and every tensor in it goes
to the output as it is, replaced by its trained value, or with its LoRA delta folded in: a LoRA Linear is merged
by PEFT's own `merge` on that one fp32 weight (DoRA included), a routed expert `...experts.{e}.gate_proj.weight`
gets expert e's rank-r update of the stacked adapter (B_e A_e × scale, in fp32, as PEFT's merge computes it). The
result is cast once to the output dtype and written straight to its place in a Hub-sized shard
(`model.shards.ShardWriter`). Peak memory: about one base shard (the mapped file) plus the trained state.

The base weights are always the checkpoint's own, also when training ran on a quantized copy of them
(`model.quantize`): the trained tensors and LoRA factors are applied to the original weights, never to dequantized
ones (which differ from them by the quantization error).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..model.checkpoint import (
    CONFIG_NAME,
    INDEX_FILE,
    check_keys,
    make_temp_dir,
    official_shapes,
    replace_dir,
    stacked_key,
    to_official,
    weight_files,
)
from ..model.config import VL2Config
from ..model.deepseek_vl2 import DeepseekVL2ForCausalLM
from ..model.shards import DEFAULT_MAX_SHARD_SIZE, ShardWriter, parse_shard_size, read_header
from .adapters import (
    RUN_CONFIG_FILE,
    check_full_tensors,
    load_lora_tensors,
    read_trained_state,
    resolve_trained_dir,
    resolve_trained_model,
    trained_policy,
)
from .groups import apply_policy, base_name
from .lora import expert_lora_factors

log = logging.getLogger(__name__)


def merge_checkpoint(
    base: str | Path | None,
    trained: str | Path,
    out: str | Path,
    torch_dtype: torch.dtype | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """LoRA folded in, trained tensors in place, config.json unchanged; tokenizer and processor files copied.

    `trained` is a trained-state dir, its run dir or a stock PEFT LoRA adapter; `base` None means the local base
    the trained dir records. The result is in `torch_dtype` (default: the base weights' dtype), in shards of at
    most `max_shard_size` (HF-style, e.g. "5GB"; the Hub's index when there are several)."""
    if (Path(trained) / CONFIG_NAME).is_file():
        raise ValueError(f"{trained}: a full checkpoint (already merged?), not a trained-state or run dir")
    base, trained = (Path(base), resolve_trained_dir(trained)) if base is not None else resolve_trained_model(trained)
    parse_shard_size(max_shard_size)  # a bad size fails before any work
    out = Path(out)
    quantize = _training_quantize(trained)
    log.info(
        "merging %s into the original weights of %s%s",
        trained,
        base,
        f" (training ran on a {quantize}-quantized copy of them; the merge reads the checkpoint's own weights, not "
        "dequantized ones)"
        if quantize != "none"
        else "",
    )
    config = VL2Config.from_file(base / CONFIG_NAME)
    files = weight_files(base)
    with torch.device("meta"):
        model = DeepseekVL2ForCausalLM(config)
    expected = official_shapes(model)  # in the official order
    found = _headers(files)
    check_keys(base, expected, {k: v[0] for k, v in found.items()})
    dtype = torch_dtype or next((d for _, d, _, _ in found.values() if d.is_floating_point), torch.float32)
    merger = _Merger(model, trained)
    specs = {k: (shape, dtype if found[k][1].is_floating_point else found[k][1]) for k, shape in expected.items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.tmp-")
    try:
        writer = ShardWriter(tmp, specs, max_shard_size)
        try:
            for f in files:  # one base shard at a time, front to back; its mapped pages go when it closes
                with safe_open(str(f), framework="pt") as fh:
                    for key in sorted((k for k in expected if found[k][2] == f), key=lambda k: found[k][3]):
                        writer.write(key, merger(key, fh.get_tensor(key), specs[key][1]))
        except BaseException:
            writer.abort()
            raise
        writer.close()
        merger.check_done()
        for f in sorted(base.iterdir()):  # config.json unchanged, tokenizer, processor config, ...
            if f.is_file() and f.name != INDEX_FILE and not f.name.endswith(".safetensors"):
                shutil.copy2(f, tmp / f.name)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _training_quantize(trained_dir: Path) -> str:
    """model.quantize of the run that wrote `trained_dir` (its run dir's config_resolved.yaml), "none" if unknown."""
    import yaml

    config = trained_dir.parent / RUN_CONFIG_FILE
    try:
        return str(((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("quantize", "none"))
    except (OSError, yaml.YAMLError, AttributeError):
        return "none"


def _headers(files: list[Path]) -> dict[str, tuple[tuple[int, ...], torch.dtype, Path, int]]:
    """{key: (shape, dtype, file, offset)} from the shards' headers (no tensor data read)."""
    found = {}
    for f in files:
        for key, (shape, dtype, offset) in read_header(f).items():
            if key in found:
                raise ValueError(f"{f}: key {key} appears in more than one shard")
            found[key] = (shape, dtype, f, offset)
    return found


class _Merger:
    """What the trained state does to each official key: `merger(key, base tensor, dtype)` is the merged tensor."""

    def __init__(self, model: DeepseekVL2ForCausalLM, trained_dir: Path):
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import ParamWrapper

        apply_policy(model, trained_policy(trained_dir, model.config))
        lora, full = read_trained_state(trained_dir)
        load_lora_tensors(model, lora, trained_dir)
        check_full_tensors(model, full, trained_dir)
        self.full = to_official(full)  # stacked experts trained in full: one tensor per expert
        self.linear: dict[str, LoraLinear] = {}
        self.experts: dict[str, list] = {}  # stacked parameter -> [(B [E, out, r], A [E, r, in], scale)]
        for name, module in model.named_modules():
            if isinstance(module, LoraLinear):
                self.linear[f"{base_name(name)}.weight"] = module
            elif isinstance(module, ParamWrapper) and not isinstance(_parent(model, name), ParamWrapper):
                experts, factors = expert_lora_factors(module)  # the outermost wrapper holds the whole chain
                for param, pairs in factors.items():
                    self.experts[f"{base_name(name)}.{param}"] = pairs
        # every key (or stacked expert parameter) the trained state changes: each must be met in the base (a name
        # that never matches would otherwise drop that part of the adapter silently)
        self.pending = set(self.full) | set(self.linear) | set(self.experts)

    def __call__(self, key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        name, expert = stacked_key(key)
        self.pending -= {key, name}
        if key in self.full:
            trained = self.full.pop(key)
            if tuple(trained.shape) != tuple(tensor.shape):
                raise ValueError(f"{key}: trained shape {tuple(trained.shape)}, base {tuple(tensor.shape)}")
            return trained.to(torch.float32).to(dtype)  # as a trained fp32 master copy is cast
        if expert is None and name in self.linear:
            weight = _peft_merge(self.linear[name], tensor.to(torch.float32, copy=True))  # (tensor: the mapped file)
        elif expert is not None and name in self.experts:
            weight = tensor.to(torch.float32, copy=True)
            for b, a, scale in self.experts[name]:
                weight += (b[expert] @ a[expert]) * scale  # PEFT's einsum delta, for this expert alone
        else:
            return tensor.to(dtype)
        return weight.to(dtype)

    def check_done(self) -> None:
        if self.pending:
            raise ValueError(f"trained tensors never met in the base checkpoint: {sorted(self.pending)[:10]}")


def _peft_merge(layer, weight: torch.Tensor) -> torch.Tensor:
    """PEFT's merge of `layer`'s adapter into `weight` (the layer's base weight, fp32), the layer left unmerged."""
    base = layer.get_base_layer()
    meta = base.weight
    base.weight = nn.Parameter(weight, requires_grad=False)
    try:
        layer.merge()
        return base.weight.data
    finally:
        layer.merged_adapters.clear()
        base.weight = meta


def _parent(model: nn.Module, name: str) -> nn.Module | None:
    parent, _, _ = name.rpartition(".")
    return model.get_submodule(parent) if name else None
