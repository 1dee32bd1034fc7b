"""What `trainer.recompute` recomputes in backward, per decoder layer of the language model.

- `none`: nothing beyond what the lean blocks recompute anyway (lean.py: the SwiGLU's activation and product,
  the norms' normalised values: elementwise work, no matmul).
- `selective`: also the attention's input side. The input norm and the q / kv projections (with RoPE and the
  concatenations that build Q, K and V) run again in backward instead of keeping Q, K, V, the normalised input and
  the latent for it; the fused attention kernel does not run again: its outputs (and logsumexp) are kept, as
  PyTorch's selective activation checkpointing keeps an op marked MUST_SAVE. o_proj, the router and the experts
  are not recomputed. About the FLOPs of the q / kv projections extra (the plan reports them per step).
- `full`: every decoder layer recomputed in backward (only each layer's input is kept).

With the eager attention backend, `selective` leaves attention as it is: its kernel is plain matmuls and a softmax
whose [L, L] probabilities backward needs, and recomputing its inputs would mean recomputing it too.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

RECOMPUTE = ("none", "selective", "full")
aten = torch.ops.aten
# The fused attention kernels' forward ops (SDPA on CUDA and CPU, their private entry points): kept, not recomputed.
ATTENTION_KERNELS = {
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
    aten._flash_attention_forward.default,
    aten._efficient_attention_forward.default,
}


def _keep_attention_kernel(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op in ATTENTION_KERNELS or getattr(op, "namespace", None) == "flash_attn":  # flash-attn's custom ops
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


# Entered around every re-run in backward, when set (`observing_recompute`): the memory plan counts recomputed FLOPs
# apart, and grad mode cannot tell them from backward's own: an autograd.Function's forward (the 4-bit base's
# dequantized matmuls) runs without grad even when checkpointing re-runs it.
_observer = None


@contextmanager
def observing_recompute(enter_rerun):
    """Within the block, every recompute in backward runs inside `enter_rerun()` (a context manager)."""
    global _observer
    previous, _observer = _observer, enter_rerun
    try:
        yield
    finally:
        _observer = previous


@contextmanager
def _all_of(*managers):
    with ExitStack() as stack:
        for m in managers:
            stack.enter_context(m)
        yield


def _observed(contexts):
    """`context_fn` for checkpoint: `contexts()` (forward, recompute) with the observer added to the recompute."""
    forward, rerun = contexts()
    return forward, _all_of(rerun, _observer())


def _attention_contexts():
    return create_selective_checkpoint_contexts(_keep_attention_kernel)


def _layer_contexts():
    return nullcontext(), nullcontext()


def recompute_attention_inputs(attend, *args):
    """`attend(*args)` with everything but the attention kernel recomputed in backward (see the module doc)."""
    contexts = _attention_contexts if _observer is None else lambda: _observed(_attention_contexts)
    return checkpoint(attend, *args, use_reentrant=False, context_fn=contexts, preserve_rng_state=False)


def recompute_layer(layer, *args):
    """The whole layer recomputed in backward (`full`)."""
    if _observer is None:  # checkpoint's own no-op contexts: what torch.compile accepts
        return checkpoint(layer, *args, use_reentrant=False)
    return checkpoint(layer, *args, use_reentrant=False, context_fn=lambda: _observed(_layer_contexts))
