"""Loading and saving checkpoints in the official Hugging Face layout (safetensors, optionally sharded).

Our module tree uses the checkpoint's names everywhere except the routed experts, which we keep stacked:
`...mlp.experts.gate_proj [E, I, D]` here <-> `...mlp.experts.{e}.gate_proj.weight [I, D]` on disk.
`to_official` (saving) and `_stream_tensors` (loading) are the only places that know about that difference.
Under `quantize` (quant.py) the frozen language-model weights are quantized as each tensor is read, shard by shard.

Loading is strict: a missing or unexpected key, or a shape that differs, is an error that names them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import VL2Config
from .quant import quantize_modules_, quantized_weights
from .shards import DEFAULT_MAX_SHARD_SIZE, INDEX_FILE, SINGLE_FILE, plan_shards, write_index

CONFIG_NAME = "config.json"
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
_STACKED = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def to_official(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> official key names (stacked experts split per expert), in the official order: each
    expert's projections together, experts in turn (the official `experts` is a ModuleList of MLPs)."""
    stacked: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, value in state.items():
        m = _STACKED.match(key)
        if m:
            stacked[m.group(1)][m.group(2)] = value
    out = {}
    for key, value in state.items():
        m = _STACKED.match(key)
        if not m:
            out[key] = value
        elif m.group(1) in stacked:  # the first of the layer's stacked projections: emit all its experts
            projs = stacked.pop(m.group(1))
            for e in range(value.shape[0]):
                for proj in (p for p in EXPERT_PROJS if p in projs):
                    out[f"{m.group(1)}.{e}.{proj}.weight"] = projs[proj][e]
    return out


def stacked_key(official_key: str) -> tuple[str, int | None]:
    """(our parameter name, expert index) of an official key: `...experts.{e}.gate_proj.weight` is expert e of
    the stacked `...experts.gate_proj`; any other key is its own name (index None)."""
    m = _PER_EXPERT.match(official_key)
    return (f"{m.group(1)}.{m.group(3)}", int(m.group(2))) if m else (official_key, None)


def official_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The keys and shapes the official checkpoint of this architecture has."""
    return {k: tuple(v.shape) for k, v in to_official(model.state_dict()).items()}


def weight_files(path: Path) -> list[Path]:
    """The shards the index lists (all must exist), or model.safetensors; errors name the file and the fix."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({path / f for f in weight_map.values()})
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e}); restore the checkpoint's own") from None
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{index} lists shards that are not in {path}: {', '.join(missing)}; copy them over"
            )
        return files
    if (path / SINGLE_FILE).exists():
        return [path / SINGLE_FILE]
    raise FileNotFoundError(
        f"{path}: no {SINGLE_FILE} or {INDEX_FILE}; a DeepSeek-VL2 checkpoint directory holds config.json and "
        "safetensors weights (single file or sharded with an index)"
    )


def _read_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the shards' headers (no data read); a key in two shards is an error."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                if key in shapes:
                    raise ValueError(f"{f}: key {key} appears in more than one shard")
                shapes[key] = tuple(fh.get_slice(key).get_shape())
    return shapes


def _stream_tensors(files: list[Path], dtype: torch.dtype, quantized: dict) -> dict[str, torch.Tensor]:
    """Our state dict, read shard by shard and tensor by tensor: a weight in `quantized` (name -> QuantizedTensor) is
    quantized as it is read (an expert's slice of a stacked one at a time) and not kept; the rest is cast to `dtype`
    and kept (per-expert weights stacked; `check_keys` has made sure that every expert is there)."""
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                target, index = stacked_key(key)
                t = fh.get_tensor(key)
                if target in quantized:
                    quantized[target].store_(t, index)
                    continue
                # a copy: safetensors hands out views of the mapped file, and one kept view keeps the whole shard
                # mapped (and every page read from it, quantized weights' included, resident) after it closes
                t = t.to(dtype, copy=True) if t.is_floating_point() else t.clone()
                if index is None:
                    state[key] = t
                else:
                    experts[target][index] = t
    for target, by_e in experts.items():
        state[target] = torch.stack([by_e.pop(e) for e in range(len(by_e))])
    return state


def _list(keys, limit=20) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_keys(path: Path, expected: dict[str, tuple], found: dict[str, tuple]) -> None:
    """`found`: key -> shape of the checkpoint's tensors, against the model's official `expected`."""
    found = {k: tuple(v) for k, v in found.items()}
    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys()
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_list(unexpected)}")
    bad = [
        f"{k}: checkpoint {found[k]} vs model {expected[k]}"
        for k in sorted(expected.keys() & found.keys())
        if found[k] != expected[k]
    ]
    if bad:
        problems.append(f"shape mismatches ({len(bad)}): " + "; ".join(bad[:20]))
    if problems:
        hint = ""
        if any("embed_tokens" in b or "lm_head" in b for b in bad):
            hint = " (hint: language_config.vocab_size must equal the rows of embed_tokens.weight)"
        raise ValueError(f"{path}: checkpoint does not match its config.json: " + " | ".join(problems) + hint)


def load_pretrained(
    cls,
    path: Path,
    torch_dtype,
    attn_implementation,
    experts_kernel,
    device,
    quantize="none",
    quantize_lm_head=False,
    keep_unquantized=None,
):
    """The model of checkpoint dir `path`; see DeepseekVL2ForCausalLM.from_pretrained. Keys and shapes are checked
    from the shards' headers before any weight is read."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory; pass a local DeepSeek-VL2 checkpoint directory")
    config = VL2Config.from_file(path / CONFIG_NAME)
    files = weight_files(path)
    with torch.device("meta"):  # no time or memory spent on an init that the weights replace
        model = cls(config, attn_implementation=attn_implementation, experts_kernel=experts_kernel)
    check_keys(path, official_shapes(model), _read_shapes(files))
    quantize_modules_(model, quantize, keep_unquantized, quantize_lm_head, device="cpu")  # storage to fill, on host
    quantized = quantized_weights(model)
    state = _stream_tensors(files, torch_dtype, quantized)
    incomplete = [name for name, q in quantized.items() if not q.complete]
    if incomplete:
        raise ValueError(f"{path}: quantized weights left incomplete (missing expert slices): {_list(incomplete)}")
    model.load_state_dict(state, strict=False, assign=True)  # the quantized buffers are filled already
    _materialize_buffers(model)
    model = model.to(device) if device is not None else model
    return model.eval()


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Non-persistent buffers (RoPE inv_freq) were built on meta; rebuild them on the CPU."""
    for module in model.modules():
        if hasattr(module, "inv_freq") and module.inv_freq.is_meta:
            module.reset_inv_freq()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left unloaded after from_pretrained: {_list(left)}")


def save_pretrained(model, path: Path, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, extra_files=()) -> None:
    """Write config.json + safetensors in the official layout (plus `extra_files`, e.g. the tokenizer),
    atomically (temp dir, then rename): one `model.safetensors`, or shards of at most `max_shard_size` (HF-style,
    e.g. "5GB", "500MB", or bytes) with the Hub's index."""
    if quantized_weights(model):
        raise ValueError(
            f"{path}: this model's frozen weights are quantized (model.quantize); the official layout holds the "
            "original weights: merge the trained state into the base checkpoint instead (scripts/merge.py)"
        )
    state = {k: v.detach().contiguous().cpu() for k, v in to_official(model.state_dict()).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(path.parent, f".{path.name}.tmp-")
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        write_safetensors(state, tmp, max_shard_size)
        for f in extra_files:
            shutil.copy2(f, tmp / Path(f).name)
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_safetensors(
    state: dict[str, torch.Tensor], out: Path, max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE
) -> None:
    """`state` (in the order to keep) as model.safetensors, or as shards of at most `max_shard_size` + index
    (`shards.plan_shards`); None: one file whatever the size."""
    meta = {"format": "pt"}
    if max_shard_size is None:
        files = {SINGLE_FILE: list(state)}
    else:
        files = plan_shards({k: (tuple(v.shape), v.dtype) for k, v in state.items()}, max_shard_size)
    for name, keys in files.items():
        save_safetensors({k: state[k] for k in keys}, out / name, metadata=meta)
    write_index(out, files, sum(t.numel() * t.element_size() for t in state.values()))


def current_umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it: set, then restore
    os.umask(mask)
    return mask


def honour_umask(path: str | Path, directory: bool = False) -> None:
    """Give `path` the mode a plain open()/mkdir() would (0666 / 0777 minus the umask): tempfile's mkstemp and
    mkdtemp make them 0600 / 0700, unreadable to the rest of a team on a shared file system."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `path` through a temporary file and os.replace, with the mode the umask gives."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, the file then given the mode the umask says (save_file makes it 0600)."""
    save_file(tensors, str(path), metadata=metadata)
    honour_umask(path)


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A fresh uniquely named directory in `parent` (for a write then rename into place), mode as umask says."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    honour_umask(tmp, directory=True)
    return tmp


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temp dir into place; an existing target is swapped out, then removed."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
