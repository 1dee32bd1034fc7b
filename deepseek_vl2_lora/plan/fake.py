"""Running the real training step on fake tensors: shapes, dtypes and memory without values or a GPU.

`torch._subclasses.FakeTensorMode` gives every weight, activation and gradient its real shape and dtype and
allocates nothing. Three things stand between it and the real code path; this module handles them:

- **Values the code reads on the host.** Padding checks, image layouts, segment spans, supervised-token counts
  and expert offsets read tensor values (`.tolist()`, `bool(...)`, boolean indexing), which a fake tensor does
  not have. They all derive from the batch layout, which the plan knows: the batch's token fields stay *real*
  (small) CPU tensors, and `HostValues` runs every op whose tensor inputs are all real for real, so those reads
  work and give exactly the values the real step computes. A real boolean index into a fake tensor becomes
  integer indices (the fake kernel cannot count a mask it cannot read). Routing is the one value that comes from
  weights; `assume_routing` replaces each router's choice with an explicit assumption (uniform or Zipf-skewed).
- **Which CUDA kernel runs.** Fused attention keeps the output and a logsumexp, not the [L, L] probabilities the
  math fallback would keep; `CudaAttentionKernels` sends `scaled_dot_product_attention` to the fake kernel of
  the fused kernel PyTorch picks on an H100 for these shapes (cuDNN; memory-efficient when a mask is given).
  `torch._grouped_mm`'s fake kernel takes bf16 only; other dtypes (the CUDA per-group fallback) get the same
  output shape in their own dtype.
- **The device.** On a CPU build of torch, autograd aborts the process on a fake CUDA leaf (it asks for the CUDA
  device guard, which is not linked), so the step runs on a fake *CPU* device with the CUDA kernels' memory
  accounting (those attention kernels, the grouped expert GEMM, bf16 storage and autocast, the caching
  allocator's 512-byte rounding: see tracker.py).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten
# Ops that take a list of index tensors, where a boolean mask means "the positions where it is true".
_INDEX_OPS = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


def fake_mode() -> FakeTensorMode:
    # Real tensors may meet fake ones: the batch's token fields are real on purpose (see HostValues).
    return FakeTensorMode(allow_non_fake_inputs=True)


def _is_real_host(t: torch.Tensor) -> bool:
    return not isinstance(t, FakeTensor) and t.device.type == "cpu"


class HostValues(TorchDispatchMode):
    """Ops on real host tensors run for real (their values stay readable); real boolean indices into fake tensors
    become integer indices. Must be entered inside the FakeTensorMode."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if tensors and all(_is_real_host(t) for t in tensors):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if func is aten._local_scalar_dense.default and isinstance(args[0], FakeTensor):
            # A host read of a value computed from weights: the gradient norm (clipping, the finite check) and
            # Adam's step counter. Their values change no allocation; a finite 1 is assumed.
            return True if args[0].dtype == torch.bool else 1 if not args[0].is_floating_point() else 1.0
        if func is aten._grouped_mm.default and args[0].dtype != torch.bfloat16:
            # The fake (meta) kernel accepts bf16 only; on CUDA other dtypes run a per-group fallback with the
            # same output. Shapes from the bf16 rule, dtype the inputs'.
            a, b, *rest = args
            out = func(a.to(torch.bfloat16), b.to(torch.bfloat16), *rest, **kwargs)
            return torch.empty(out.shape, dtype=a.dtype)
        if func in _INDEX_OPS:
            with unset_fake_temporarily():
                indices = []
                for i in args[1]:
                    real_mask = isinstance(i, torch.Tensor) and _is_real_host(i) and i.dtype == torch.bool
                    indices += i.nonzero().unbind(1) if real_mask else [i]
            args = (args[0], indices, *args[2:])
        return func(*args, **kwargs)


# ------------------------------------------------------------------------------------------------ attention
ATTENTION_KERNELS = {
    "cudnn": "cuDNN fused attention (saves output + logsumexp)",
    "efficient": "memory-efficient fused attention with a mask (saves output + logsumexp)",
    "flash": "flash attention (saves output + logsumexp)",
}


def cuda_attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> str:
    """The fused SDPA kernel PyTorch picks on an H100 (torch ≥ 2.9 with cuDNN ≥ 9.15, which prefers cuDNN) for
    these shapes: cuDNN for head dims ≤ 128 or MLA's 192/128 without a mask, memory-efficient with a mask."""
    if mask is not None:
        return "efficient"
    dqk, dv = q.shape[-1], v.shape[-1]
    if (dqk <= 128 and dv <= 128) or (dqk, dv) == (192, 128):
        return "cudnn"
    return "flash" if dqk == dv and dqk <= 256 else "efficient"


def fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """`F.scaled_dot_product_attention` through the fused kernel `cuda_attention_kernel` names (its fake kernel
    has the CUDA kernel's outputs; autograd saves what that kernel saves)."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype).masked_fill(~attn_mask, -math.inf)
    kernel = cuda_attention_kernel(q, k, v, attn_mask)
    if kernel == "cudnn":
        out = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, dropout_p, is_causal, False, scale=scale)
    elif kernel == "flash":
        out = aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False, scale=scale)
    else:
        if attn_mask is not None:
            attn_mask = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        out = aten._scaled_dot_product_efficient_attention(q, k, v, attn_mask, True, dropout_p, is_causal, scale=scale)
    return out[0]


class CudaAttentionKernels:
    """Within the context, `F.scaled_dot_product_attention` (ours, timm's) runs as `fused_attention`; `kernels`
    records which kernels ran, for the plan. The function itself is swapped, not intercepted by a function mode:
    a recomputed layer (activation checkpointing) runs inside backward, where function modes are not active."""

    def __init__(self):
        self.kernels: set[str] = set()
        self._original = None

    def _sdpa(self, q, k, v, attn_mask=None, *args, **kwargs):
        self.kernels.add(cuda_attention_kernel(q, k, v, attn_mask))
        return fused_attention(q, k, v, attn_mask, *args, **kwargs)

    def __enter__(self):
        self._original = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = self._sdpa
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self._original


# -------------------------------------------------------------------------------------------------- routing
def routing_assumption(n_tokens: int, n_experts: int, top_k: int, skew: float, seed: int) -> torch.Tensor:
    """Expert choices [n_tokens, top_k] (distinct per token): uniform (skew 0: every expert gets the same number of
    token copies, ±1) or drawn from a Zipf(skew) popularity over a random expert order (as the benchmark's skewed
    router). Deterministic in `seed`, so a recomputed layer routes the same way."""
    gen = torch.Generator().manual_seed(seed)
    if skew <= 0:
        start = torch.arange(n_tokens)[:, None] * top_k
        return (start + torch.arange(top_k)[None]) % n_experts
    popularity = 1.0 / torch.arange(1, n_experts + 1, dtype=torch.float64) ** skew
    popularity = popularity[torch.randperm(n_experts, generator=gen)]
    choice = torch.multinomial(popularity.expand(n_tokens, n_experts), top_k, replacement=False, generator=gen)
    return choice


@contextmanager
def assume_routing(model: torch.nn.Module, skew: float = 0.0):
    """Each MoE router's top-k choice (`Router.choose`) replaced by `routing_assumption`; the weights still come
    from the router's own scores at those experts, so gradients flow as in training."""
    from ..model.moe import Router

    routers = [m for m in model.modules() if isinstance(m, Router)]
    for layer, router in enumerate(routers):

        def choose(scores, router=router, layer=layer):
            with unset_fake_temporarily():  # real indices (on the scores' device when that is real, e.g. a GPU run)
                idx = routing_assumption(scores.shape[0], router.n_experts, router.top_k, skew, seed=layer)
                return idx if isinstance(scores, FakeTensor) else idx.to(scores.device)

        router.choose = choose
    try:
        yield
    finally:
        for router in routers:
            del router.choose  # back to the class's method
