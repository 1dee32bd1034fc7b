"""Everything a training run can check before the model loads (minutes for a 16B checkpoint).

`preflight(cfg, run_dir, env)` runs right after `check_config` (optimizer and LoRA values are checked there) and
before `trainer.load_model`:

* the checkpoint directory: `config.json` parses and is a DeepSeek-VL2 config; the safetensors index parses and
  its shards exist; every shard's header (read from the file's first bytes: no tensor data) is complete and the
  shard is as long as its header says; together they hold exactly the keys and shapes that config implies (the
  model built on the meta device, `checkpoint.official_shapes`);
* `processor_config.json` and the tokenizer files exist and load (cheap; the data checks need the tokenizer);
* the data files exist and every record validates (`data.SFTDataset` / `EvalDataset`, kept for the run; image
  headers only, cached in data.cache_dir: local rank 0 validates, the other ranks read its result);
* `trainer.resume`: the path exists and is an intact checkpoint (or a run directory with one), written by this
  run's engine kind and number of ranks.

Each failure is a user error (train.py prints it without a traceback) on one line naming the file or key and
the fix. This module never imports the trainer; the trainer imports it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .. import REPO_ROOT
from ..data import DataReport, EvalDataset, Mixture, SFTDataset
from ..data.images import DEFAULT_MAX_IMAGE_PIXELS
from ..data.mixture import source_names
from ..data.processor import DeepseekVL2Processor, SampleError, one_line
from ..model.checkpoint import CONFIG_NAME, check_keys, official_shapes, weight_files
from ..model.config import VL2Config
from ..model.tiny import ensure_tiny_checkpoint
from .config import ConfigError
from .dist_env import DistEnv
from .train_state import STATE_FILE, ResumeError, find_resume_checkpoint

_MAX_HEADER = 100 * 2**20  # safetensors' own limit on a header's size


@dataclass
class Preflight:
    """What the checks built and the run keeps: the checkpoint directory, the processor and the data sets."""

    model_dir: Path
    processor: DeepseekVL2Processor
    train_set: SFTDataset | Mixture  # a Mixture when data.train lists sources
    loss_set: SFTDataset | None  # the eval split, for the eval loss
    gen_set: EvalDataset | None  # the eval split, for generation
    reports: dict[str, DataReport]  # train, eval; a mixture: train (all sources) and train/<name> per source
    resume_from: Path | None = None  # the checkpoint an explicit trainer.resume path names, verified (not `auto`)


def preflight(cfg, run_dir: Path, env: DistEnv | None = None) -> Preflight:
    """Check the checkpoint files, processor, data and resume path of a composed, checked config (see above)."""
    env = env or DistEnv()
    model_dir = resolve_model_dir(cfg.model)
    check_checkpoint_files(model_dir)
    processor = DeepseekVL2Processor.from_pretrained(model_dir)
    specs = mixture_specs(cfg.data)  # its paths resolved: a wrong one is reported before any data is validated
    if specs is None:
        train_file = resolve_data_file(cfg.data.train_path, "data.train_path")
    if cfg.data.eval_path:  # a wrong path is reported before the training set is validated
        resolve_data_file(cfg.data.eval_path, "data.eval_path")
    resume_from = check_resume(cfg.trainer.resume, run_dir, cfg.dist.kind, env)
    max_length = train_max_length(cfg.data, cfg.trainer)
    try:
        if specs is None:
            options = {**dataset_options(cfg.data, processor), "max_length": max_length}
            train_set = SFTDataset(train_file, overlong=cfg.data.overlong, split=cfg.data.train_split, **options)
            reports = {"train": train_set.report}
        else:
            train_set, reports = train_mixture(cfg.data, processor, specs, max_length)
    except SampleError as e:
        if e.reason != "overlong" or max_length == cfg.data.max_length:
            raise
        raise SampleError(
            e.reason, f"{e.message}: longer than a row of trainer.pack_length={max_length}, which "
            f"data.tokens_per_micro_batch packs; raise trainer.pack_length or set data.overlong=skip (or truncate)",
            e.location,
        ) from None  # fmt: skip
    loss_set = gen_set = None
    if cfg.data.eval_path:
        loss_set, gen_set = eval_datasets(cfg.data, processor)
        reports["eval"] = gen_set.report
    return Preflight(model_dir, processor, train_set, loss_set, gen_set, reports, resume_from)


def dataset_options(data_cfg, processor: DeepseekVL2Processor) -> dict:
    """The keyword arguments every dataset of a run is built with (data.* settings shared by all splits)."""
    image_root = resolve_data_file(data_cfg.image_root, "data.image_root") if data_cfg.image_root else None
    return dict(
        processor=processor,
        on_bad_sample=data_cfg.on_bad_sample,
        max_length=data_cfg.max_length,
        image_root=image_root,
        columns=dict(data_cfg.get("columns") or {}),
        exif_transpose=bool(data_cfg.get("exif_transpose", False)),  # (absent from configs older than the option)
        max_image_pixels=data_cfg.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS),
        large_image=data_cfg.get("large_image", "reject"),
        cache_dir=data_cfg.get("cache_dir"),  # validation_cache: local rank 0 validates, the other ranks read
    )


def train_max_length(data_cfg, trainer_cfg) -> int | None:
    """The longest training sample: data.max_length, or with token-budget batching (data.tokens_per_micro_batch)
    at most a row (trainer.pack_length): a longer sample is over-long, data.overlong decides."""
    if not data_cfg.get("tokens_per_micro_batch") or trainer_cfg.pack_length is None:
        return data_cfg.max_length
    return min(data_cfg.max_length or trainer_cfg.pack_length, trainer_cfg.pack_length)


def mixture_specs(data_cfg) -> list[dict] | None:
    """data.train as plain dicts ({path, weight, name, ...}; a bare path: weight 1), paths resolved and names
    filled in; None: unset."""
    if data_cfg.get("train") is None:
        return None
    specs = [{"path": s} if isinstance(s, str) else OmegaConf.to_container(s) for s in data_cfg.train]
    for i, spec in enumerate(specs):
        spec["path"] = resolve_data_file(spec["path"], f"data.train[{i}].path")
    for spec, name in zip(specs, source_names(specs)):
        spec["name"] = name
    return specs


def train_mixture(
    data_cfg, processor: DeepseekVL2Processor, specs: list[dict], max_length: int | None
) -> tuple[Mixture, dict[str, DataReport]]:
    """The sources of data.train validated and mixed (`data/mixture.py`); reports: `train` (all sources) and
    `train/<name>` per source, with its sampling. `max_length`: the longest sample (`train_max_length`)."""
    datasets, reports = [], {}
    for i, spec in enumerate(specs):
        options = {**dataset_options(data_cfg, processor), "max_length": max_length}
        if spec.get("image_root"):
            options["image_root"] = resolve_data_file(spec["image_root"], f"data.train[{i}].image_root")
        if spec.get("columns") is not None:
            options["columns"] = dict(spec["columns"])
        dataset = SFTDataset(spec["path"], overlong=data_cfg.overlong, split=spec.get("split"), **options)
        used = len(dataset) if spec.get("limit") is None else min(spec["limit"], len(dataset))
        if used == 0:
            raise ConfigError(
                f"data.train[{i}] ({spec['name']}, {spec['path']}): no usable records "
                f"({dataset.report.num_skipped} skipped, see the data report); fix or drop the source"
            )
        datasets.append(dataset if used == len(dataset) else torch.utils.data.Subset(dataset, range(used)))
        reports[f"train/{spec['name']}"] = dataset.report
    mixture = Mixture([s["name"] for s in specs], datasets, [float(s.get("weight", 1.0)) for s in specs])
    combined = DataReport(f"mixture of {len(specs)} sources, {len(mixture)} draws per epoch")
    for report, sampling in zip(reports.values(), mixture.describe()):
        report.sampling = sampling
        combined.total += report.total
        combined.kept += report.kept
        combined.skipped.update(report.skipped)
        combined.placeholders_added += report.placeholders_added
    layouts = sorted({r.layout for r in reports.values() if r.layout})
    combined.layout = "+".join(layouts) or None
    return mixture, {"train": combined, **reports}


def eval_datasets(data_cfg, processor: DeepseekVL2Processor) -> tuple[SFTDataset, EvalDataset]:
    """(loss set, generation set) of data.eval_path: the eval split for the eval loss and for exact match."""
    eval_file = resolve_data_file(data_cfg.eval_path, "data.eval_path")
    kw = dict(split=data_cfg.get("eval_split"), **dataset_options(data_cfg, processor))
    return SFTDataset(eval_file, overlong="skip", purpose="eval", **kw), EvalDataset(eval_file, **kw)


# ------------------------------------------------------------------------------------------------ paths
def resolve_model_dir(model_cfg) -> Path:
    """The checkpoint directory: `model.path` (checked for a config.json) when set, else a generated tiny one."""
    if model_cfg.path is None and model_cfg.tiny_family is not None:
        return ensure_tiny_checkpoint(model_cfg.tiny_family, seed=model_cfg.tiny_seed)
    hub = model_cfg.hub_id or "deepseek-ai/deepseek-vl2-tiny"
    where = (
        f"download {hub} from https://huggingface.co/{hub} on a machine with access "
        f"(`huggingface-cli download {hub} --local-dir {hub.split('/')[-1]}`), copy the directory over and pass "
        f"model.path=/path/to/{hub.split('/')[-1]}"
    )
    if model_cfg.path is None:
        raise ConfigError(
            f"model={model_cfg.name} needs its checkpoint: {where}. "
            "(To try the pipeline without a download: model=tiny_random, the default; to plan GPU memory for this "
            "model without its weights: trainer.dry_run=true.)"
        )
    path = Path(model_cfg.path).expanduser()
    if not (path / CONFIG_NAME).is_file():
        raise ConfigError(
            f"model.path={path}: no config.json there; expected a DeepSeek-VL2 checkpoint directory: {where}"
        )
    return path


def resolve_data_file(path: str, key: str = "data file") -> Path:
    """A data path as given (absolute, or relative to the working directory), else relative to the repo root."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    if not p.is_absolute() and (REPO_ROOT / p).exists():
        return REPO_ROOT / p
    where = f"looked in {Path.cwd()} and {REPO_ROOT}" if not p.is_absolute() else "no such file"
    name = f"{key}={path}" if key.startswith("data.") else f"data file {path}"
    raise ConfigError(f"{name} not found ({where}); fix the path")


# ------------------------------------------------------------------------------------------------ checkpoint files
def check_checkpoint_files(model_dir: Path) -> None:
    """config.json, the index, the shards' headers and lengths, keys and shapes: a ConfigError on one line if not."""
    config_path = model_dir / CONFIG_NAME
    try:
        config = VL2Config.from_file(config_path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(
            f"{config_path}: not a DeepSeek-VL2 config ({one_line(e)}); restore the checkpoint's own config.json"
        ) from None
    found: dict[str, tuple[int, ...]] = {}
    try:
        shards = weight_files(model_dir)
    except (OSError, ValueError) as e:
        raise ConfigError(one_line(e)) from None
    for shard in shards:
        for key, shape in read_safetensors_header(shard).items():
            if key in found:
                raise ConfigError(f"{shard}: key {key} appears in more than one shard; restore the checkpoint's files")
            found[key] = tuple(shape)
    from ..model.deepseek_vl2 import DeepseekVL2ForCausalLM  # the model module is heavy; loaded anyway right after

    with torch.device("meta"):  # shapes only: no memory, no init
        model = DeepseekVL2ForCausalLM(config)
    try:
        check_keys(model_dir, official_shapes(model), found)
    except ValueError as e:
        raise ConfigError(f"{e}; the weights and config.json must come from the same checkpoint") from None


def read_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """{key: shape} from a safetensors file's header (its first bytes only), after checking that the file is as
    long as the header says (a truncated copy is not)."""
    fix = "copy the file again from the original checkpoint"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            (length,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
            if length is None or length > min(size - 8, _MAX_HEADER):
                raise ConfigError(f"{path}: truncated or not a safetensors file ({size} bytes); {fix}")
            header = json.loads(f.read(length))
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
        shapes = {k: tuple(int(n) for n in v["shape"]) for k, v in entries.items()}
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise ConfigError(f"{path}: unreadable safetensors header ({one_line(e)}); {fix}") from None
    if 8 + length + end > size:
        raise ConfigError(f"{path}: truncated ({size} bytes, its header describes {8 + length + end}); {fix}")
    return shapes


# ------------------------------------------------------------------------------------------------ resume
def check_resume(resume: str | None, run_dir: Path, dist_kind: str, env: DistEnv) -> Path | None:
    """The checkpoint `trainer.resume` names: an intact one (or a run dir's newest intact one) of this engine kind
    and rank count. None for null and `auto` (checked when the run resumes: an empty run dir starts from scratch)."""
    if resume in (None, "auto"):
        return None
    path = Path(resume).expanduser()
    if not path.is_dir():
        raise ResumeError(
            f"trainer.resume={resume}: no such directory; pass a checkpoint directory (<run dir>/checkpoints/"
            "step_XXXXXXXX), a run directory, auto (this run dir) or null"
        )
    found = find_resume_checkpoint(str(path), run_dir, verify=env.is_main)
    try:
        state = json.loads((found / STATE_FILE).read_text())
        layout = (state["dist"], state["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ResumeError(f"{found / STATE_FILE}: unreadable ({one_line(e)}); resume from another checkpoint") from None
    if layout != (dist_kind, env.world_size):
        raise ResumeError(
            f"{found} was written by dist={layout[0]} with {layout[1]} rank(s); this run is dist={dist_kind} with "
            f"{env.world_size}: resume with dist={layout[0]} on {layout[1]} rank(s)"
        )
    return found
