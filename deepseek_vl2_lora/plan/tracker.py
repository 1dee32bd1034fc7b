"""Memory accounting of one training step: every tensor storage an op creates, by category, with the peak.

A `TorchDispatchMode` sees the outputs of every op (fake or real), registers each new storage with its size
rounded as the CUDA caching allocator rounds it (512-byte blocks), and drops it when the storage is freed (a
weak-reference callback), so the running total is what `torch.cuda.memory_allocated` would read. Storages that
exist before the step (weights, optimizer state, the batch) are registered by the caller.

Categories: `weights` (frozen parameters and buffers), `trainable` (trainable parameters: the fp32 master copies
in one process), `gradients` (a trainable parameter's `.grad`, retagged when autograd accumulates it),
`optimizer` (optimizer state), `activations` (created in the forward pass and the batch) and `temporaries`
(created in backward or in the optimizer step, gradients excepted). Activations are also counted by module kind
(kinds.py): at the peak, and at the end of the forward pass (what the forward leaves for backward: the tensors
autograd saved, the loss and the batch). Each op's matmul FLOPs are counted by phase; ops that run in backward
with gradients enabled are a recompute (activation checkpointing re-running a forward), counted apart.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from ..model.recompute import observing_recompute
from .kinds import AFTER_LM, BEFORE_LM, is_language_model, module_kinds, op_flops

CATEGORIES = ("weights", "trainable", "gradients", "optimizer", "activations", "temporaries")
MODEL_STATES = ("weights", "trainable", "gradients", "optimizer")
CUDA_BLOCK = 512  # the caching allocator rounds every allocation up to a multiple of 512 bytes


def allocated_bytes(nbytes: int, block: int) -> int:
    return 0 if nbytes == 0 else -(-nbytes // block) * block


@dataclass
class Snapshot:
    total: int = 0
    by_category: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))
    moment: str = ""  # phase and innermost module when this snapshot was taken
    activation_kinds: dict[str, int] = field(default_factory=dict)  # activation bytes by module kind

    def copy(self, moment: str) -> Snapshot:
        return Snapshot(self.total, dict(self.by_category), moment, dict(self.activation_kinds))

    @property
    def transient(self) -> int:
        """Activations and temporaries: what does not depend on how model states are sharded."""
        return self.by_category["activations"] + self.by_category["temporaries"]


class MemoryTracker(TorchDispatchMode):
    """Live bytes per category and the peak of the step (`peak`), of its activations + temporaries in forward and
    backward (`peak_transient`) and of the optimizer step's temporaries (`peak_step_temporaries`: the foreach
    AdamW's scratch, which spans all trainable parameters). `phase` is set by the caller ("forward", "backward",
    "optimizer step")."""

    def __init__(self, block: int = CUDA_BLOCK):
        super().__init__()
        self.block = block
        self.now = Snapshot()
        self.peak = Snapshot()
        self.peak_transient = Snapshot()
        self.peak_step_temporaries = 0
        self._phase = "setup"
        self._storages = WeakIdKeyDictionary()  # storage -> [bytes, category]
        self._names: dict[int, str] = {}  # id(module) -> qualified name, for the moment of the peak
        self._stack: list[str] = []  # modules whose forward is running
        self._backward_module = ""
        self._hooks: list = []
        self._kinds: dict[int, str] = {}  # id(module) -> kind (kinds.py)
        self.layers_per_kind: dict[str, int] = {}
        self._kind_stack: list[str] = []
        self._after_lm = False  # the language model has returned in this forward pass: top-level ops are the loss
        self.end_of_forward: dict[str, int] = {}  # activation bytes by kind when backward starts (largest micro batch)
        self.flops = {"forward": 0, "backward": 0, "recompute": 0}  # matmul/attention FLOPs (none in the step)
        self._rerunning = 0  # depth of recompute re-runs (model.recompute's observer)

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        if value == "backward" and self._phase != "backward":
            self._backward_module = "the loss (lm_head)"  # backward starts there, before any module's gradients
            if sum(self.now.activation_kinds.values()) > sum(self.end_of_forward.values()):
                self.end_of_forward = dict(self.now.activation_kinds)
        if value == "forward":
            self._after_lm = False
        self._phase = value

    # -- registration ------------------------------------------------------------------------------------
    def register(self, tensor: torch.Tensor, category: str, retag: bool = True, kind: str | None = None) -> None:
        """Count `tensor`'s storage under `category` (and, for activations, under `kind`: by default the running
        module's); one counted already is retagged (unless `retag` is False: an op's output that aliases an
        existing storage, a view or an in-place result, keeps its category)."""
        st = tensor.untyped_storage()
        entry = self._storages.get(st)
        if entry is not None:
            if retag and entry[1] != category:
                self._count(entry, -1)
                entry[1] = category
                self._count(entry, 1)
            return
        nbytes = allocated_bytes(st.nbytes(), self.block)
        entry = [nbytes, category, kind or self._current_kind()]
        self._storages[st] = entry
        weakref.finalize(st, self._freed, entry)
        self.now.total += nbytes
        self._count(entry, 1)
        self._update_peaks()

    def _count(self, entry, sign: int) -> None:
        nbytes, category, kind = entry
        self.now.by_category[category] += sign * nbytes
        if category == "activations":
            self.now.activation_kinds[kind] = self.now.activation_kinds.get(kind, 0) + sign * nbytes

    def _freed(self, entry) -> None:
        self.now.total -= entry[0]
        self._count(entry, -1)

    def _current_kind(self) -> str:
        if self._kind_stack:
            return self._kind_stack[-1]
        return AFTER_LM if self._after_lm else BEFORE_LM

    def register_module(self, module: torch.nn.Module) -> None:
        self._names.update((id(m), name) for name, m in module.named_modules() if name)
        self._kinds, self.layers_per_kind = module_kinds(module)
        for p in module.parameters():
            self.register(p, "trainable" if p.requires_grad else "weights")
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: self.register(p.grad, "gradients"))
        for b in module.buffers():
            self.register(b, "weights")

    def register_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for state in optimizer.state.values():
            for t in state.values():
                if isinstance(t, torch.Tensor) and t.dim() > 0:  # a 0-dim `step` counter lives on the host
                    self.register(t, "optimizer")

    # -- tracking ------------------------------------------------------------------------------------------
    def _category(self) -> str:
        return "activations" if self.phase == "forward" else "temporaries"

    def _moment(self) -> str:
        if self.phase == "forward":
            return "forward" + (f" of {self._stack[-1]}" if self._stack else "")
        if self.phase == "backward":
            return "backward" + (f" of {self._backward_module}" if self._backward_module else "")
        return self.phase

    # Where the step is: a forward pre/post hook on every module keeps the stack of running modules, and tags
    # the autograd node of each module's output, so backward knows which module's gradients it computes. (Not
    # torch's ModuleTracker: its gradient hooks keep recomputed activations alive under checkpointing.)
    def _pre_forward(self, module, args):
        name = self._names.get(id(module))
        if name is not None:
            self._stack.append(name)
            self._kind_stack.append(self._kinds.get(id(module), self._current_kind()))

    def _post_forward(self, module, args, output):
        name = self._names.get(id(module))
        if name is None:
            return
        if self._stack and self._stack[-1] == name:
            self._stack.pop()
            self._kind_stack.pop()
        if is_language_model(module):
            self._after_lm = True
        for t in tree_leaves(output):
            if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                t.grad_fn.metadata.setdefault("module", name)

    def _update_peaks(self) -> None:
        if self.now.total > self.peak.total:
            self.peak = self.now.copy(self._moment())
        if self._phase == "optimizer step":
            self.peak_step_temporaries = max(self.peak_step_temporaries, self.now.by_category["temporaries"])
        elif self.now.transient > self.peak_transient.transient:
            self.peak_transient = self.now.copy(self._moment())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.phase == "backward":
            node = torch._C._current_autograd_node()
            if node is not None and "module" in node.metadata:
                self._backward_module = node.metadata["module"]
        out = func(*args, **(kwargs or {}))
        phase = self.phase
        if phase == "backward" and (torch.is_grad_enabled() or self._rerunning):
            # A forward op re-run by activation checkpointing: backward proper runs without grad; a Function's
            # forward re-run does too, hence the model's recompute observer (`rerunning`).
            phase = "recompute"
        if phase in self.flops:
            self.flops[phase] += op_flops(func, args, kwargs or {}, out)
        category = self._category()
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.register(t, category, retag=False)
        return out

    @contextmanager
    def rerunning(self):
        self._rerunning += 1
        try:
            yield
        finally:
            self._rerunning -= 1

    def __enter__(self):
        self._hooks = [
            register_module_forward_pre_hook(self._pre_forward),
            register_module_forward_hook(self._post_forward),
        ]
        self._observing = observing_recompute(self.rerunning)
        self._observing.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._observing.__exit__(None, None, None)
        for h in self._hooks:
            h.remove()
