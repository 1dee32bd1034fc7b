"""Merge a trained-state directory (or a run dir) into its base checkpoint: a full checkpoint in the official layout.

The base weights are always the checkpoint's own, read from its safetensors, also when training ran on a quantized
copy of them (`model.quantize`): the trained tensors and LoRA factors are applied to the original weights, never to
dequantized ones (which differ from them by the quantization error)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..model.checkpoint import CONFIG_NAME, INDEX_FILE
from ..model.deepseek_vl2 import DeepseekVL2ForCausalLM
from .adapters import load_trained_state, resolve_trained_dir, resolve_trained_model
from .lora import merge_lora

log = logging.getLogger(__name__)


def merge_checkpoint(base: str | Path | None, trained: str | Path, out: str | Path, torch_dtype=None) -> Path:
    """LoRA folded in, trained tensors in place, config.json unchanged; tokenizer and processor files copied.

    `trained` is a trained-state dir or its run dir; `base` None means the adapter's base_model_name_or_path.
    Merging happens in float32; the result is saved in `torch_dtype` (default: the base weights' dtype)."""
    if (Path(trained) / CONFIG_NAME).is_file():
        raise ValueError(f"{trained}: a full checkpoint (already merged?), not a trained-state or run dir")
    base, trained = (Path(base), resolve_trained_dir(trained)) if base is not None else resolve_trained_model(trained)
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
    model = DeepseekVL2ForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    load_trained_state(model, trained)
    merge_lora(model)
    dtype = torch_dtype or _stored_dtype(base)
    model.to(dtype)
    extra = [
        f
        for f in sorted(base.iterdir())
        if f.is_file() and f.name != CONFIG_NAME and f.name != INDEX_FILE and not f.name.endswith(".safetensors")
    ]
    model.save_pretrained(out, extra_files=extra)
    return out


def _training_quantize(trained_dir: Path) -> str:
    """model.quantize of the run that wrote `trained_dir` (its run dir's config_resolved.yaml), "none" if unknown."""
    import yaml

    config = trained_dir.parent / "config_resolved.yaml"
    try:
        return str(((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("quantize", "none"))
    except (OSError, yaml.YAMLError, AttributeError):
        return "none"


def _stored_dtype(path: Path) -> torch.dtype:
    from safetensors import safe_open

    first = next(iter(sorted(path.glob("*.safetensors"))))
    with safe_open(str(first), framework="pt") as fh:
        for key in fh.keys():
            t = fh.get_slice(key)
            dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(t.get_dtype())
            if dtype is not None:
                return dtype
    return torch.float32
