"""Resumable training checkpoints and the deterministic data order they restore.

A checkpoint is a directory `<run dir>/checkpoints/step_XXXXXXXX/` holding only what the run cannot rebuild
from its config and the base checkpoint:

    trainable.safetensors   trainable tensors (policy-trained weights and LoRA adapters), by parameter name
    optimizer.pt            optimizer + lr scheduler state (written by the engine)
    rng.pt                  python, numpy, torch and CUDA generator states (rank 0; rank r: rng_rank{r}.pt)
    state.json              loop state: step, data position (epoch, batch), sampler, counters, W&B run id, and
                            the layout that wrote it (dist kind, world size)
    manifest.json           size and SHA-256 of every other file, written last (manifest.py)

DeepSpeed engines write, instead of optimizer.pt, `deepspeed/` (DeepSpeed's checkpoint: each rank's optimizer
shard with the fp32 master copies of its slice of the trainable parameters; frozen parameters excluded) and
`scheduler.pt`. Their optimizer shards are per rank, so a checkpoint resumes with the same dist kind and world
size only (checked, with a message saying so).

It is written to a temporary directory and renamed into place (a killed run leaves either the whole
checkpoint or none), then `checkpoints/latest` is replaced atomically; older checkpoints beyond
`keep_last` are deleted afterwards. With several ranks, rank 0 creates and publishes the directory and every
rank writes its own files in between (barriers around); the run directory must be on a file system all nodes
share. All our files load with `torch.load(weights_only=True)` or as JSON.

Resume verifies the manifest first and loads nothing from a checkpoint that fails it: a damaged newest checkpoint
is reported (which file, what is wrong) and the newest intact one is used instead (find_resume_checkpoint). So
DeepSpeed's `load_checkpoint`, which unpickles its files (`torch.load(weights_only=False)`), only ever reads files
this code wrote and whose checksums still match.

The training order is a function of (seed, epoch) only: epoch e visits `randperm(n)` drawn from a generator
seeded with `seed * 1_000_003 + e`, cut into global batches of `micro_batch_size × world_size` (the last partial
batch is dropped); rank r takes the interleaved slice `global_batch[r::world_size]`. So 2 ranks × micro batch m
see exactly the samples of 1 rank × micro batch 2m, the data position (epoch, batch) counts global batches and is
the whole sampler state, and a resumed run sees exactly the batches the uninterrupted run would have seen. A
mixture of sources (`data.train`, `data/mixture.py`) replaces the randperm by its own order, also a function of
(seed, epoch) only. Token-budget batching (`data.tokens_per_micro_batch`, `data/budget.py`) bins that order into
packed rows; the position then counts its global micro batches, and the state's `extra["budget"]` records what
the bins depend on (row length, rows per global micro batch, the sample lengths' digest).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..data.sampling import batches_per_epoch
from ..model.checkpoint import replace_dir, save_safetensors
from .dist_env import DistEnv
from .manifest import verify_manifest, write_manifest

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINABLE_FILE = "trainable.safetensors"
RNG_FILE = "rng.pt"
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def is_step_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a step checkpoint (checkpoints/step_XXXXXXXX of a run): its state and trainable tensors."""
    return (Path(path) / STATE_FILE).is_file() and (Path(path) / TRAINABLE_FILE).is_file()


class ResumeError(RuntimeError):
    """A checkpoint to resume from is missing or does not fit this run."""


# --------------------------------------------------------------------------------------------- step count
def total_steps(max_steps: int | None, epochs: int | None, per_epoch, grad_accum: int) -> int:
    """The run's optimizer steps: `max_steps`, or with `epochs` set (it wins) ceil(global micro batches in those
    epochs / grad_accum), `per_epoch(e)` being epoch e's (the data's batches, or the token budget's bin plan). A
    function of the config and the data only, so a resumed run computes the same number."""
    if epochs is None:
        return int(max_steps)
    return max(1, math.ceil(sum(per_epoch(e) for e in range(epochs)) / grad_accum))


# --------------------------------------------------------------------------------------------- loop state
@dataclass
class TrainState:
    step: int = 0  # optimizer steps done (skipped non-finite steps included)
    epoch: int = 0  # data position of the next batch
    batch: int = 0
    num_samples: int = 0  # sampler: training set size, per-rank micro batch size and number of ranks the
    batch_size: int = 0  # position refers to (it counts global batches of batch_size × world_size)
    seed: int = 0
    world_size: int = 1
    dist: str = "single"  # the engine that wrote the checkpoint (its optimizer state format)
    tokens_seen: int = 0
    samples_seen: int = 0
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    last_step_finite: bool = True
    wandb_id: str | None = None
    eval_before: dict | None = None  # the untrained model's eval, to report the gain after a resume
    extra: dict = field(default_factory=dict)

    def advance(self, epoch: int, index: int, per_epoch: int | None = None) -> None:
        """Record that batch `index` of `epoch` was consumed (`per_epoch`: the epoch's batches, when not
        num_samples // (batch_size × world_size): token-budget batching)."""
        self.epoch, self.batch = epoch, index + 1
        if per_epoch is None:
            per_epoch = batches_per_epoch(self.num_samples, self.batch_size * self.world_size)
        if self.batch >= per_epoch:
            self.epoch, self.batch = epoch + 1, 0


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


# --------------------------------------------------------------------------------------------- save / load
def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def rng_file(rank: int) -> str:
    return RNG_FILE if rank == 0 else f"rng_rank{rank}.pt"


def _layout(engine) -> tuple[str, DistEnv]:
    return getattr(engine, "kind", "single"), getattr(engine, "env", None) or DistEnv()


def save_checkpoint(run_dir: Path, state: TrainState, trainable: dict[str, torch.Tensor], engine, keep_last: int):
    """Write a checkpoint for `state.step` atomically, point `latest` at it, prune to `keep_last`.

    With several ranks every rank calls it: rank 0 writes `trainable` (the full tensors; other ranks pass {}),
    state.json and the directory moves, each rank its RNG states and (through `engine.save`) its optimizer shard."""
    _, env = _layout(engine)
    root = Path(run_dir) / CHECKPOINTS
    final = root / step_dir_name(state.step)
    tmp = root / f".tmp-{final.name}"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    engine.barrier()
    try:
        if env.is_main:
            save_safetensors({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / TRAINABLE_FILE)
        engine.save(tmp)
        torch.save(rng_state(), tmp / rng_file(env.rank))
        engine.barrier()
        if env.is_main:
            record = {**asdict(state), "saved_at": time.time()}
            (tmp / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
            write_manifest(tmp)  # last: a checkpoint with a verified manifest has all its files
            replace_dir(tmp, final)
    finally:
        if env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    if env.is_main:
        latest_tmp = root / f".{LATEST}.tmp-{os.getpid()}"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, root / LATEST)
        if keep_last > 0:
            for old in list_checkpoints(run_dir)[:-keep_last]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
    engine.barrier()
    return final


def clean_temporary(run_dir: str | Path) -> None:
    """Remove temporary directories left by a run killed while writing a checkpoint."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if not (p.name.startswith((".tmp-", f".{LATEST}.tmp-")) or ".old-" in p.name):
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (by `latest`, else by step), unverified."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _step_dirs(run_dir: Path) -> list[Path]:
    """Every step directory of a run, newest first, whole or not."""
    root = Path(run_dir) / CHECKPOINTS
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)), reverse=True)


def newest_intact_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run whose manifest verifies; each newer damaged one is logged as a warning.
    None when the run has no checkpoint; a ResumeError naming the damaged files when it has only damaged ones."""
    damaged = []
    for path in _step_dirs(run_dir):
        problems = verify_manifest(path)
        if not problems:
            if damaged:
                log.warning("resuming from %s, the newest intact checkpoint", path)
            return path
        damaged.append(f"{path.name}: {'; '.join(problems)}")
        log.warning("checkpoint %s is damaged, not using it: %s", path, "; ".join(problems))
    if damaged:
        raise ResumeError(
            f"no intact checkpoint in {Path(run_dir) / CHECKPOINTS} ({' | '.join(damaged)}); move the run dir aside "
            "to start from scratch"
        )
    return None


def find_resume_checkpoint(resume: str | None, run_dir: Path, verify: bool = True) -> Path | None:
    """`trainer.resume` -> the checkpoint directory to load, or None to start fresh.

    `auto` (this run dir) and a run dir: its newest intact checkpoint (see newest_intact_checkpoint); a checkpoint
    directory: that one, which must be intact. `verify=False` (ranks other than 0, which take rank 0's choice):
    the newest one, unchecked."""
    if resume is None:
        return None
    path = Path(run_dir) if resume == "auto" else Path(resume)
    if resume != "auto" and ((path / STATE_FILE).is_file() or _STEP_DIR.match(path.name)):
        problems = verify_manifest(path) if verify else []
        if problems:
            raise ResumeError(f"trainer.resume={resume}: the checkpoint is damaged: {'; '.join(problems)}")
        return path
    if not verify:
        found = _step_dirs(path)
        return found[0] if found else None
    found = newest_intact_checkpoint(path)
    if found is None and resume != "auto":
        raise ResumeError(
            f"trainer.resume={resume}: neither a checkpoint directory (with {STATE_FILE}) nor a run directory "
            f"with checkpoints under {CHECKPOINTS}/"
        )
    return found


def agree_on_checkpoint(engine, path: Path | None) -> Path | None:
    """With several ranks: rank 0's choice of checkpoint (it verified the manifests), on every rank. A collective."""
    _, env = _layout(engine)
    if env.world_size == 1:
        return path
    match = _STEP_DIR.match(path.name) if path is not None else None
    mine = -1 if path is None else int(match.group(1)) if match else -2  # -2: a checkpoint dir named otherwise
    chosen = int(engine.gather_from_ranks([mine])[0][0])
    if chosen == mine:
        return path
    if chosen < 0 or path is None:
        raise ResumeError(f"rank {env.rank} found checkpoint {path}, rank 0 another one (step {chosen})")
    return path.with_name(step_dir_name(chosen))


def load_checkpoint(path: Path, engine, load_trainable) -> tuple[TrainState, dict]:
    """Load trainable tensors (through `load_trainable(tensors, source)`) and the engine state; return the loop
    state and this rank's RNG states, which the caller restores last, right before the loop continues.

    The checkpoint must come from the same engine kind and number of ranks (a ResumeError says so otherwise)."""
    path = Path(path)
    raw = json.loads((path / STATE_FILE).read_text())
    raw.pop("saved_at", None)
    state = TrainState(**raw)
    kind, env = _layout(engine)
    if (state.dist, state.world_size) != (kind, env.world_size):
        raise ResumeError(
            f"{path} was written by dist={state.dist} with {state.world_size} rank(s); this run is dist={kind} with "
            f"{env.world_size}. Its optimizer state is stored in that layout (per rank): resume with "
            f"dist={state.dist} on {state.world_size} rank(s) and the same trainer.micro_batch_size."
        )
    load_trainable(load_file(str(path / TRAINABLE_FILE)), str(path / TRAINABLE_FILE))
    engine.load(path)
    rng = torch.load(path / rng_file(env.rank), map_location="cpu", weights_only=True)
    return state, rng
