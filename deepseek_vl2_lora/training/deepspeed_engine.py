"""The DeepSpeed ZeRO-2/3 engine behind the loop's `Engine` interface (engine.py): our AdamW over the policy's
parameter groups handed to `deepspeed.initialize`, which shards its state (ZeRO-2: optimizer state and gradients;
ZeRO-3: the weights too, frozen ones included) and does the gradient all-reduce/reduce-scatter, the clipping and the
update; the lr schedule stays ours. `deepspeed_config` fills the DeepSpeed JSON
(`deepseek_vl2_lora/configs/deepspeed/zero{2,3}.json`) from the Hydra config: one source of truth."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from .. import CONFIG_DIR, REPO_ROOT
from .dist_env import DistEnv, EngineError, free_port
from .optim import build_optimizer, build_scheduler, group_names

log = logging.getLogger(__name__)
SCHEDULER_FILE = "scheduler.pt"  # our lr schedule (DeepSpeed's own files hold the optimizer)
DEEPSPEED_TAG = "deepspeed"  # DeepSpeed's checkpoint files go to <checkpoint>/deepspeed/
DEEPSPEED_CONFIG_DIR = CONFIG_DIR / "deepspeed"


def deepspeed_config(
    dist_cfg, trainer_cfg, optim_cfg, precision: str, world_size: int, micro_batch: int | None = None
) -> dict:
    """The DeepSpeed JSON for this run: `dist.deepspeed_config` (default
    `deepseek_vl2_lora/configs/deepspeed/<kind>.json`) with its
    batch, accumulation, clipping, precision and ZeRO-stage fields taken from the Hydra config (`micro_batch`: the
    micro batch per rank when not trainer.micro_batch_size, e.g. the packed rows of data.tokens_per_micro_batch).

    A field may be "auto" or absent (filled in) or equal to what the Hydra config says; a different value is an
    error, so the Hydra config stays the one source of truth. The optimizer and lr schedule are ours (`optim.*`):
    a JSON with an "optimizer" or "scheduler" section is an error too."""
    path = Path(dist_cfg.deepspeed_config or DEEPSPEED_CONFIG_DIR / f"{dist_cfg.kind}.json").expanduser()
    if not path.is_absolute() and not path.exists() and (REPO_ROOT / path).exists():
        path = REPO_ROOT / path
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EngineError(f"dist.deepspeed_config={path}: cannot read it as JSON ({e})") from None
    problems = [
        f'"{key}" section: the {key} comes from optim.* here' for key in ("optimizer", "scheduler") if key in cfg
    ]
    if cfg.get("fp16", {}).get("enabled") not in (None, False):
        problems.append('"fp16": not supported; bf16 follows trainer.precision')

    def fill(node: dict, key: str, value, source: str) -> None:
        current = node.get(key, "auto")
        if current == "auto":
            node[key] = value
        elif current != value:
            problems.append(f'"{key}": {current!r}, but {source} gives {value!r} (use "auto")')

    tc = trainer_cfg
    micro, source = tc.micro_batch_size, "trainer.micro_batch_size"
    if micro_batch is not None:
        micro, source = micro_batch, "data.tokens_per_micro_batch / trainer.pack_length (packed rows)"
    fill(cfg, "train_micro_batch_size_per_gpu", micro, source)
    fill(cfg, "gradient_accumulation_steps", tc.grad_accum, "trainer.grad_accum")
    global_batch = micro * tc.grad_accum * world_size
    fill(cfg, "train_batch_size", global_batch, f"micro batch × grad_accum × {world_size} ranks")
    fill(cfg, "gradient_clipping", float(optim_cfg.grad_clip), "optim.grad_clip")
    fill(cfg.setdefault("bf16", {}), "enabled", precision == "bf16", f"trainer.precision ({precision})")
    zero = cfg.setdefault("zero_optimization", {})
    fill(zero, "stage", {"zero2": 2, "zero3": 3}[dist_cfg.kind], f"dist={dist_cfg.kind}")
    if dist_cfg.offload_optimizer:
        zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": True})
        cfg["zero_force_ds_cpu_optimizer"] = False  # our torch AdamW steps on the CPU shards
    if dist_cfg.offload_params:
        if dist_cfg.kind != "zero3":
            problems.append("dist.offload_params needs dist=zero3 (ZeRO-2 does not shard the weights)")
        zero.setdefault("offload_param", {"device": "cpu", "pin_memory": True})
    if problems:
        raise EngineError(f"dist.deepspeed_config {path}:\n  " + "\n  ".join(problems))
    return cfg


class _OutputDict(dict):
    """The model's `VL2Output` fields as a dict that still reads as `out.loss`, `out.logits`, ...

    DeepSpeed finds a forward's output tensors (to hook its backward prologue on them, and ZeRO-3's pre-backward
    parameter gathering) in tensors, tuples, lists and dicts only, not in dataclasses."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _output_as_dict(module, args, output):
    if dataclasses.is_dataclass(output) and not isinstance(output, dict):
        return _OutputDict({f.name: getattr(output, f.name) for f in dataclasses.fields(output)})
    return output


def _has_bf16_overflow_check() -> bool:
    """Whether this DeepSpeed's bf16 config knows `check_grad_overflow` (it rejects unknown keys)."""
    try:
        from deepspeed.runtime.precision_config import DeepSpeedBF16Config

        return "check_grad_overflow" in DeepSpeedBF16Config.model_fields
    except (ImportError, AttributeError):
        return False


def import_deepspeed(kind: str, device: torch.device | None = None):
    """`import deepspeed`, or an EngineError saying how to install it. On a CPU run, DeepSpeed's CPU accelerator."""
    if device is not None and device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise EngineError(
            f"dist={kind} needs DeepSpeed, which is not installed. Install it against this torch "
            "with `pip install --no-build-isolation 'deepspeed>=0.16'`, or train with dist=single."
        ) from None
    return deepspeed


class DeepSpeedEngine:
    """DeepSpeed ZeRO-2/3 over the same loop (see the module docstring); one process per GPU (or CPU rank, gloo).

    - Batches: DeepSpeed's micro batch is trainer.micro_batch_size per rank, its accumulation trainer.grad_accum;
      `backward` runs DeepSpeed's backward without its 1/grad_accum scaling (the loop already divides) and calls
      its `step()` after every micro batch but the last, so DeepSpeed's boundary is the loop's.
    - Non-finite steps: a micro loss that is not finite is multiplied by NaN, so its gradients are NaN and the
      gradient norm DeepSpeed all-reduces is not finite on every rank; DeepSpeed's ZeRO optimizer then skips the
      update (its overflow check: in fp32 and ZeRO-3; in bf16 ZeRO-2 with `bf16.check_grad_overflow`, which is set
      here wherever the installed DeepSpeed has it). If a DeepSpeed applies such an update anyway, the run stops
      with an error instead of training on corrupted weights.
    - ZeRO-3: the MoE blocks are leaf modules (all their experts gathered on entry), so a rank whose tokens miss
      an expert runs the same collectives as the others.
    - Checkpoints: `gather_trainable` assembles the full fp32 trainable tensors (DeepSpeed's master copies) for
      trainable.safetensors; `save` writes DeepSpeed's per-rank optimizer shards with frozen parameters excluded.
    """

    def __init__(
        self, model, param_groups: list[dict], optim_cfg, max_steps: int, env: DistEnv, ds_config: dict, kind: str
    ):
        device = next(model.parameters()).device
        logging.getLogger("compilers").setLevel(logging.WARNING)  # DeepSpeed's op probes log each test compile
        deepspeed = import_deepspeed(kind, device)
        from ..model.moe import MoE

        if device.type == "cuda":
            torch.cuda.set_device(device)
        if "MASTER_ADDR" not in os.environ and env.world_size == 1:  # `python train.py dist=zero2`: a group of one
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0")
            os.environ["WORLD_SIZE"] = "1"
        if device.type == "cpu":
            # DeepSpeed's shared-memory all-reduce op serves inference only (training reduces through gloo here)
            # and is JIT-compiled on first use, about a minute: leave it out.
            with suppress(Exception):
                deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        if torch.distributed.get_world_size() != env.world_size:
            raise EngineError(
                f"WORLD_SIZE={env.world_size} but the process group has {torch.distributed.get_world_size()}"
            )
        self.env, self.kind, self.model, self.device = env, kind, model, device
        self.ds_config = ds_config
        self.version = deepspeed.__version__
        self.optimizer = build_optimizer(param_groups, optim_cfg)  # trainable parameters only
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, max_steps)  # ours: moves on skipped steps too
        bf16 = ds_config.get("bf16", {})
        if bf16.get("enabled") and "check_grad_overflow" not in bf16 and _has_bf16_overflow_check():
            bf16["check_grad_overflow"] = True  # skip non-finite bf16 steps (off by default in older releases)
        model.register_forward_hook(_output_as_dict)
        if kind == "zero3" and any(isinstance(m, MoE) for m in model.modules()):
            deepspeed.utils.set_z3_leaf_modules(model, [MoE])
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds_config)
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def forward(self, **inputs):
        return self.ds(**inputs)

    def backward(self, loss: torch.Tensor, last_micro: bool = True) -> None:
        if self.ds.is_gradient_accumulation_boundary() != last_micro:
            raise EngineError("DeepSpeed's accumulation boundary is out of step with the loop's micro batches")
        poison = torch.where(torch.isfinite(loss), 1.0, float("nan"))  # x·1.0 == x: finite losses are unchanged
        self.ds.backward(loss * poison, scale_wrt_gas=False)
        if not last_micro:
            self.ds.step()  # counts the micro step; DeepSpeed updates only at the boundary

    def optimizer_step(self, max_norm: float, loss_finite: bool) -> tuple[float, bool]:
        """DeepSpeed's boundary step: reduce, norm, clip to `gradient_clipping` (= max_norm), AdamW - or no update
        when the gradients are not finite. Returns (grad norm before clipping; inf on a skipped step, applied)."""
        self.ds.step()
        applied = bool(self.ds.was_step_applied())
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        if applied and not (loss_finite and math.isfinite(norm)):
            raise EngineError(
                f"DeepSpeed {self.version} applied an update although the loss or gradient norm was not finite "
                f"(loss finite: {loss_finite}, grad norm {norm}); the weights can no longer be trusted. This "
                "DeepSpeed does not skip non-finite steps in this mode: upgrade it (bf16 needs a DeepSpeed whose "
                'bf16 config has "check_grad_overflow") or train in fp32.'
            )
        self.scheduler.step()  # the lr schedule moves on whether or not the update was applied
        return norm, applied

    def lrs(self) -> dict[str, float]:
        return {g.get("name", str(i)): g["lr"] for i, g in enumerate(self.optimizer.param_groups)}

    def _tensor(self, values: list[float]) -> torch.Tensor:
        device = self.device if self.device.type == "cuda" else torch.device("cpu")  # nccl: CUDA tensors
        return torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        t = self._tensor(values)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather_from_ranks(self, values: list[float]) -> list[list[float]]:
        """Every rank's `values`, in rank order (the same list on every rank)."""
        t = self._tensor(values)
        out = t.new_empty(self.env.world_size * t.numel())
        torch.distributed.all_gather_into_tensor(out, t)
        return out.view(self.env.world_size, t.numel()).tolist()

    def gather_trainable(self) -> tuple[dict[str, torch.Tensor], bool]:
        """(full fp32 trainable tensors on rank 0, {} elsewhere; whether all are finite, the same on every rank).

        A collective: every rank must call it. One parameter at a time, so the peak is one full tensor."""
        from deepspeed.utils import safe_get_full_fp32_param

        tensors, finite = {}, True
        for name, p in self.trainable:
            full = safe_get_full_fp32_param(p)
            full = (p.detach() if full is None else full).float()  # None: not managed by ZeRO (full already)
            finite = finite and bool(torch.isfinite(full).all())
            if self.env.is_main:
                tensors[name] = full.cpu()
        return tensors, finite

    @contextmanager
    def full_trainable_params(self):
        """On rank 0, every trainable parameter holds its full fp32 value (the optimizer's master copy) inside the
        block, e.g. for `save_trained_state`; the sharded/bf16 tensors are back afterwards. All ranks must enter."""
        tensors, _ = self.gather_trainable()
        saved = {}
        try:
            for name, p in self.trainable:
                if name in tensors:
                    saved[name] = p.data
                    p.data = tensors[name].to(p.device)
            yield
        finally:
            for name, p in self.trainable:
                if name in saved:
                    p.data = saved[name]

    def load_trainable(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """The trainable tensors are restored by DeepSpeed's own files (`load`), fp32 master copies included; here
        the checkpoint's trainable set is only checked against this run's policy."""
        names = {n for n, _ in self.trainable}
        missing, unexpected = names - tensors.keys(), tensors.keys() - names
        if missing or unexpected:
            raise EngineError(
                f"{source}: trainable tensors do not match the policy: missing {sorted(missing)[:10]}, "
                f"unexpected {sorted(unexpected)[:10]}"
            )

    def save(self, directory: Path) -> None:
        """DeepSpeed's checkpoint under <directory>/deepspeed/ (every rank writes its optimizer shard; frozen
        parameters excluded) plus our lr schedule. All ranks must call it."""
        self.ds.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
        if self.env.is_main:
            state = {"scheduler": self.scheduler.state_dict(), "groups": group_names(self.optimizer)}
            torch.save(state, Path(directory) / SCHEDULER_FILE)

    def load(self, directory: Path) -> None:
        path = Path(directory) / SCHEDULER_FILE
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["groups"] != group_names(self.optimizer):
            raise EngineError(
                f"{path}: optimizer groups {state['groups']} do not match this run's {group_names(self.optimizer)} "
                "(policy changed?)"
            )
        loaded, _ = self.ds.load_checkpoint(
            str(directory),
            tag=DEEPSPEED_TAG,
            load_module_strict=False,  # the checkpoint holds the trainable parameters only
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
        if loaded is None:
            raise EngineError(f"{directory}: DeepSpeed found no checkpoint under {DEEPSPEED_TAG}/")
        self.scheduler.load_state_dict(state["scheduler"])

    def barrier(self) -> None:
        torch.distributed.barrier()
