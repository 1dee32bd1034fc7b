"""Low precision judged against fp32 truth, by the rule flash-attention's own tests use.

A bf16 result is never compared with another bf16 result under a fixed tolerance: two bf16 computations of the
same function differ by rounding noise whose size depends on the model and the data, so such a tolerance cannot
tell noise from a bug. Instead the model is built in bf16, so that its weights are exact in fp32, and the same
function is computed in fp32 on those same weights (the truth). Each bf16 path's error is measured against the
truth, and a path passes when

    err(path) ≤ FACTOR · err(baseline) + EPS

where the baseline is the plain bf16 path (eager attention, loop experts: the official-style computation). A
faster path may round differently, but not much worse than the plain one does.

Used by `scripts/bench.py` (its agreement block) and `tests/test_gpu.py` (on CUDA, and in bf16 on the CPU).
"""

from __future__ import annotations

import math
import statistics
from contextlib import contextmanager

import torch

FACTOR = 2.0
# Absolute slack on a relative error: covers a baseline whose error is ~0 by luck (a scalar loss, or fp32 runs,
# where every path equals the truth up to ~1e-6) without loosening the rule where bf16 noise is ~1e-2 or more.
EPS = 1e-3


@contextmanager
def in_fp32(model: torch.nn.Module):
    """The model itself with every floating parameter and buffer in fp32 for the duration, then back in the dtypes
    they had. For a model built in bf16 both casts are exact: this is the fp32 computation on the same weights,
    without a second copy of the model in memory."""
    tensors = [(t, t.dtype) for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    for t, _ in tensors:
        t.data = t.data.float()
    try:
        yield model
    finally:
        for t, dtype in tensors:
            t.data = t.data.to(dtype)


def relative_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    """‖value − truth‖ / ‖truth‖, in float64 (0 when both are zero, inf when only the truth is)."""
    value, truth = value.detach().double(), truth.detach().double().to(value.device)
    diff, norm = (value - truth).norm().item(), truth.norm().item()
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def tensor_errors(values: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-tensor relative errors of `values` against `truth` (the same names). Tensors whose truth is exactly
    zero carry no scale to measure against and are left out (e.g. LoRA A's gradient while B = 0); `values` must
    be exactly zero there too, else the error is inf."""
    if values.keys() != truth.keys():
        raise ValueError(f"different tensors: {sorted(values.keys() ^ truth.keys())[:5]}")
    out = {}
    for name, t in truth.items():
        if bool(t.eq(0).all()):
            if not bool(values[name].eq(0).all()):
                out[name] = math.inf
            continue
        out[name] = relative_error(values[name], t)
    return out


def overall_error(values: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> float:
    """One relative error over all tensors together (their concatenation): big tensors weigh more."""
    diff = sum(((values[n].detach().double() - t.detach().double()).norm() ** 2).item() for n, t in truth.items())
    norm = sum((t.detach().double().norm() ** 2).item() for t in truth.values())
    return math.sqrt(diff / norm) if norm else (0.0 if diff == 0 else math.inf)


def summarize(errors: dict[str, float]) -> dict:
    """Median and max of per-tensor errors, with the worst tensor's name."""
    if not errors:
        return {"median": 0.0, "max": 0.0, "worst": None, "tensors": 0}
    worst = max(errors, key=errors.get)
    return {"median": statistics.median(errors.values()), "max": errors[worst], "worst": worst, "tensors": len(errors)}


def within(err: float, baseline_err: float, factor: float = FACTOR, eps: float = EPS) -> bool:
    """The pass rule: err ≤ factor · baseline_err + eps."""
    return err <= factor * baseline_err + eps


def rule_text(factor: float = FACTOR, eps: float = EPS) -> str:
    return f"err(path) <= {factor:g} x err(reference) + {eps:g}, both against fp32 on the same bf16-exact weights"
