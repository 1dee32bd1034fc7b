"""Activation-lean pieces of the decoder layer: autograd functions that keep for backward only what the gradients
need, and recompute the cheap elementwise rest there. Their results and gradients are the plain forms' (same ops,
same dtypes and roundings; tests/test_lean.py compares them with the plain forms written out).

- `swiglu(gate, up, act, scale)`: act(gate) · up, optionally times a per-row scale (the routed experts' routing
  weight, applied before the down projection: Σ_k w_k·down(h_k) = Σ_k down(w_k·h_k)). Keeps gate and up (and the
  scale); the activation and the product are recomputed in backward. The scale's gradient is the row-wise dot of
  the incoming gradient with the recomputed product, so no expert output is kept and no fp32 [N, k, D] product is
  made. The plain form keeps four [rows, I] tensors (gate, act, up, product) and, for the routing weights, the
  expert outputs [N·k, D].
- `rms_norm(x, weight, eps)`: DeepSeek-V2's RMSNorm (statistics in fp32, scale applied after casting back). Keeps
  x as it came (bf16 under bf16) and the fp32 1/rms per row; the plain form keeps an fp32 copy of x.
- `linear_cross_entropy(h, weight, targets)`: Σ CE(h·Wᵀ, targets) in row chunks. The loss is linear in its
  gradients, so each chunk's gradients (h's and, when lm_head trains, W's) are formed in the forward pass and
  backward only scales them: no fp32 logits are kept and lm_head does not run again in backward. A chunk's fp32
  logits stay under 256 MiB.

The backward formulas are written out (no `torch.autograd.grad` inside), so `torch.compile` traces them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

aten = torch.ops.aten
ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}
# d act(x) / dx applied to a gradient: the kernels autograd itself uses for these activations.
_ACTIVATION_BACKWARD = {
    "silu": lambda grad, x: aten.silu_backward(grad, x),
    "gelu": lambda grad, x: aten.gelu_backward(grad, x),
    "relu": lambda grad, x: aten.threshold_backward(grad, F.relu(x), 0),
}


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act {name!r} not supported; expected one of {sorted(ACTIVATIONS)}")
    return name


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, scale, act: str):
        ctx.act = act
        ctx.save_for_backward(gate, up, scale)
        h = ACTIVATIONS[act](gate) * up
        if scale is not None:  # fp32 routing weight times the product, cast back for the down projection
            h = (h * scale.unsqueeze(-1)).to(gate.dtype)
        return h

    @staticmethod
    def backward(ctx, grad):
        gate, up, scale = ctx.saved_tensors
        need_gate, need_up, need_scale, _ = ctx.needs_input_grad
        activated = ACTIVATIONS[ctx.act](gate)
        d_scale = None
        if scale is not None:
            if need_scale:  # in the scale's precision (fp32 at least), as autograd of the plain product
                wide = torch.promote_types(grad.dtype, scale.dtype)
                d_scale = (grad.to(wide) * (activated * up).to(wide)).sum(-1)
            grad = (grad * scale.unsqueeze(-1)).to(gate.dtype)
        d_up = grad * activated if need_up else None
        d_gate = _ACTIVATION_BACKWARD[ctx.act](grad * up, gate) if need_gate else None
        return d_gate, d_up, d_scale, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, act: str = "silu", scale: torch.Tensor | None = None):
    """act(gate) · up [· scale[:, None]] keeping only gate, up (and scale) for backward."""
    return _SwiGLU.apply(gate, up, scale, act)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        need_x, need_weight, _ = ctx.needs_input_grad
        x32 = x.float()
        normed = (x32 * rstd).to(x.dtype)
        d_weight = d_x = None
        if need_weight:
            d_weight = (grad * normed).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        if need_x:
            # through the product with the weight (cast to the normed dtype, as autograd casts it), the cast to
            # x's dtype, and x32 · rsqrt(mean(x32²) + eps)
            d_normed = (grad * weight).to(x.dtype).float()
            d_rstd = (d_normed * x32).sum(-1, keepdim=True)
            d_x = (d_normed * rstd + x32 * (d_rstd * -rstd.pow(3) / x.shape[-1])).to(x.dtype)
        return d_x, d_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNorm.apply(x, weight, eps)


LOGITS_CHUNK_BYTES = 2**28  # fp32 logits of one loss chunk


def loss_chunk_rows(vocab_size: int) -> int:
    """Rows per loss chunk: fp32 logits ≤ 256 MiB, a multiple of 128 rows (at least 128)."""
    return max(128, LOGITS_CHUNK_BYTES // (4 * vocab_size) // 128 * 128)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, with_grads: bool):
        need_h, need_w = (with_grads and n for n in ctx.needs_input_grad[:2])
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        d_h = torch.zeros_like(h) if need_h else None
        d_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, h.shape[0], chunk):
            rows, t = h[start : start + chunk], targets[start : start + chunk]
            raw = F.linear(rows, weight)  # bf16 under autocast
            dtype, logits = raw.dtype, raw.float()
            del raw
            # log-sum-exp and softmax in place, op by op (logsumexp would make a hidden [chunk, V] temporary)
            target_logit = logits.gather(1, t[:, None]).squeeze(1)
            top = logits.amax(dim=-1, keepdim=True)
            exp = logits.sub_(top).exp_()
            sums = exp.sum(dim=-1, keepdim=True)
            total = total + (top.squeeze(1) + sums.log().squeeze(1) - target_logit).sum()
            if need_h or need_w:  # softmax - onehot, in the logits' dtype as autograd would pass it
                probs = exp.div_(sums)
                d_logits = probs.scatter_add_(1, t[:, None], probs.new_full((len(t), 1), -1.0)).to(dtype)
                if need_h:
                    d_h[start : start + chunk] = torch.mm(d_logits, weight.to(d_logits.dtype))
                if need_w:
                    d_w += torch.mm(d_logits.t(), rows.to(d_logits.dtype))
        ctx.save_for_backward(d_h, d_w)
        return total

    @staticmethod
    def backward(ctx, grad):
        d_h, d_w = ctx.saved_tensors
        return (
            None if d_h is None else (d_h.float() * grad).to(d_h.dtype),
            None if d_w is None else d_w * grad,
            None,
            None,
            None,
        )


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Σ over rows of CE(h·weightᵀ, targets) (fp32), with the gradients formed in the forward pass."""
    return _LinearCrossEntropy.apply(h, weight, targets, chunk, torch.is_grad_enabled())
