"""DeepSeek-V2 feed-forward blocks: the dense SwiGLU MLP and the MoE (router, routed experts, shared experts).

Differences from the official code, on purpose:
- one forward for train and eval: the official eval path runs under `no_grad` and `noaux_tc` asserts in
  training; here every router variant trains and gradients reach experts and router in both modes;
- the aux loss is returned (per layer, already scaled by `aux_loss_alpha`) instead of being injected into the
  backward pass unseen, so it can be reported next to the LM loss and added to it by the training loop;
- routed experts are stacked tensors `[E, out, in]` (the checkpoint's per-expert keys are stacked on load and
  split on save), so they can run as a grouped GEMM; the per-expert loop stays as the reference kernel;
- the SwiGLU keeps only gate and up for backward (lean.py), and the routing weight multiplies each token copy's
  SwiGLU output before the down projection instead of the expert output after it: Σ_k w_k·down(h_k) =
  Σ_k down(w_k·h_k), so backward needs neither the expert outputs nor an fp32 [N, k, D] product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LanguageConfig
from .lean import check_activation, swiglu
from .quant import QuantizedTensor, dequantized_grouped_mm

EXPERT_KERNELS = ("loop", "grouped", "auto")


class MLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x)), no biases (dense layers and shared experts)."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = check_activation(act)

    def forward(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.act))


class Router(nn.Module):
    """The MoE gate (`mlp.gate`): fp32 scores, top-k selection, weight normalisation, aux loss."""

    def __init__(self, cfg: LanguageConfig):
        super().__init__()
        e = cfg.n_routed_experts
        self.n_experts, self.top_k = e, cfg.num_experts_per_tok
        self.method, self.scoring = cfg.topk_method, cfg.scoring_func
        self.n_group, self.topk_group = cfg.n_group or 1, cfg.topk_group or 1
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.alpha, self.seq_aux = cfg.aux_loss_alpha, cfg.seq_aux
        self.weight = nn.Parameter(torch.empty(e, cfg.hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)
        if self.method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(e))

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        return mask.repeat_interleave(self.n_experts // self.n_group, dim=1)

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """The top-k expert indices [N, k] per `topk_method` (scores [N, E] after softmax or sigmoid)."""
        n = scores.shape[0]
        if self.method == "greedy":
            return scores.topk(self.top_k, dim=-1, sorted=False).indices
        if self.method == "group_limited_greedy":
            group_best = scores.view(n, self.n_group, -1).max(dim=-1).values
            masked = scores.masked_fill(~self._group_mask(group_best), 0.0)
            return masked.topk(self.top_k, dim=-1, sorted=False).indices
        # noaux_tc: choose on biased scores (the weights still come from the unbiased ones)
        biased = scores + self.e_score_correction_bias.float()[None]
        group_top2 = biased.view(n, self.n_group, -1).topk(2, dim=-1).values.sum(dim=-1)
        masked = biased.masked_fill(~self._group_mask(group_top2), 0.0)
        return masked.topk(self.top_k, dim=-1, sorted=False).indices

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x [B, S, D] -> topk_idx [N, k], topk_weight [N, k] (fp32), aux_loss (scalar, training only)."""
        b, s, d = x.shape
        logits = F.linear(x.reshape(-1, d).float(), self.weight.float())
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        idx = self.choose(scores)
        weight = scores.gather(1, idx)  # every method weighs a chosen expert by its (unbiased) score
        if self.top_k > 1 and self.norm_topk_prob:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        weight = weight * self.scaling
        aux = self._aux_loss(scores, idx, b, s) if self.training and self.alpha > 0 else None
        return idx, weight, aux

    def _aux_loss(self, scores, idx, b, s):
        e, k = self.n_experts, self.top_k
        if self.seq_aux:
            counts = torch.zeros(b, e, device=scores.device).scatter_add_(
                1, idx.view(b, -1), torch.ones(b, s * k, device=scores.device)
            )
            ce = counts / (s * k / e)
            return (ce * scores.view(b, s, e).mean(dim=1)).sum(dim=1).mean() * self.alpha
        fi = F.one_hot(idx.view(-1), num_classes=e).float().mean(0) * e
        return (scores.mean(0) * fi).sum() * self.alpha


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Where `torch._grouped_mm` has a real kernel: bf16 on Hopper/Blackwell; fp32 and bf16 on CPU (aten
    fallback; bf16 is how the GPU configurations run on a CPU in tests)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a, b, offs=offs)


# torch.compile's shape rule for _grouped_mm accepts bf16 only; the CPU fp32 fallback runs outside the graph.
_grouped_mm_eager = torch.compiler.disable(_grouped_mm)


def looped_gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`torch._grouped_mm(a, b, offs)` as one matmul per group (any dtype and device; reads `offs` on the host)."""
    out, start = [], 0
    for g, end in enumerate(offs.tolist()):
        out.append(a[start:end] @ b[g])
        start = end
    return torch.cat(out)


class RoutedExperts(nn.Module):
    """E SwiGLU experts as stacked weights: gate_proj/up_proj [E, I, D], down_proj [E, D, I] (parameters, or
    QuantizedTensors under `model.quantize`, quant.py: then the loop kernel runs as per-expert matmuls over the
    expert-sorted tokens, so that each projection is dequantized once per call, not once per expert)."""

    def __init__(self, n_experts: int, hidden: int, intermediate: int, act: str = "silu", kernel: str = "auto"):
        super().__init__()
        if kernel not in EXPERT_KERNELS:
            raise ValueError(f"experts kernel {kernel!r}; expected one of {EXPERT_KERNELS}")
        self.n_experts, self.kernel = n_experts, kernel
        self.gate_proj = nn.Parameter(torch.empty(n_experts, intermediate, hidden))
        self.up_proj = nn.Parameter(torch.empty(n_experts, intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, intermediate))
        for w in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(w, std=0.02)
        self.act = check_activation(act)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor, lora: dict | None = None):
        """x [N, D], idx/weight [N, k] -> sum_k weight * expert_idx(x) (the routing weight applied inside the
        expert, before its down projection; the sum over k accumulates in fp32 and is cast back once, like the
        official combine).

        `lora` maps a projection name (`gate_proj`, `up_proj`, `down_proj`) to low-rank updates
        `[(B [E, out, r], A [E, r, in], scale), ...]`: expert e's weight acts as W[e] + scale·B[e]·A[e], applied
        to the tokens routed to e as two thin matmuls, never as a dense E·out·in delta."""
        kernel = self.kernel
        if kernel == "auto":
            kernel = "grouped" if x.is_cuda and grouped_mm_supported(x) else "loop"
        lora = lora or {}
        w = weight.reshape(-1)
        if kernel == "grouped":
            y = self._grouped(x, idx, w, lora)
        elif isinstance(self.gate_proj, QuantizedTensor):  # one dequantize per projection, not one per expert
            y = self._grouped(x, idx, w, lora, gmm=looped_gmm)
        else:
            y = self._loop(x, idx, w, lora)
        # y [N·k, D]: token n's copy j at row n·k + j, already weighted
        n, k = idx.shape
        return y.view(n, k, -1).sum(dim=1).to(x.dtype)

    def _expert(self, e: int, h: torch.Tensor, weight: torch.Tensor, lora: dict) -> torch.Tensor:
        def proj(name, inp):
            out = F.linear(inp, getattr(self, name)[e])
            for b, a, scale in lora.get(name, ()):
                out = out + scale * F.linear(F.linear(inp, a[e].to(inp.dtype)), b[e].to(inp.dtype))
            return out

        return proj("down_proj", swiglu(proj("gate_proj", h), proj("up_proj", h), self.act, weight))

    def _loop(self, x, idx, weight, lora):
        """Reference kernel: one masked matmul chain per expert, as the official training branch does."""
        flat = idx.reshape(-1)
        xs = x.repeat_interleave(idx.shape[1], dim=0)
        y = xs.new_zeros(xs.shape)
        for e in range(self.n_experts):
            sel = flat == e
            y[sel] = self._expert(e, xs[sel], weight[sel], lora).to(y.dtype)
        return y

    def _grouped(self, x, idx, weight, lora, gmm=None):
        """Sort token copies by expert, three grouped GEMMs (+ two thin ones per LoRA update), unsort. No host
        sync (unless `gmm` is `looped_gmm`: the loop kernel over quantized experts)."""
        k = idx.shape[1]
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        offs = torch.bincount(flat, minlength=self.n_experts).cumsum(0).to(torch.int32)
        xs = x[order // k]
        dt = xs.dtype
        gmm = gmm or (_grouped_mm if dt == torch.bfloat16 else _grouped_mm_eager)

        def proj(name, inp):
            w = getattr(self, name)
            if isinstance(w, QuantizedTensor):  # dequantized for this GEMM only (and again in backward)
                out = dequantized_grouped_mm(inp, w, offs, gmm)
            else:
                out = gmm(inp, w.to(dt).transpose(-2, -1), offs)
            for b, a, scale in lora.get(name, ()):
                pad = -a.shape[1] % 8  # grouped GEMM strides must be 16-byte aligned: rank to a multiple of 8
                a = F.pad(a.to(dt), (0, 0, 0, pad)).contiguous()
                b = F.pad(b.to(dt), (0, pad)).contiguous()
                out = out + scale * gmm(gmm(inp, a.transpose(-2, -1), offs), b.transpose(-2, -1), offs)
            return out

        h = swiglu(proj("gate_proj", xs), proj("up_proj", xs), self.act, weight[order])
        out = proj("down_proj", h)
        y = torch.empty_like(out)
        y[order] = out
        return y


class MoE(nn.Module):
    """Router + routed experts + optional shared experts (`mlp.gate`, `mlp.experts`, `mlp.shared_experts`)."""

    def __init__(self, cfg: LanguageConfig, experts_kernel: str = "auto"):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = RoutedExperts(
            cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.hidden_act, experts_kernel
        )
        self.shared_experts = None
        if cfg.n_shared_experts is not None:
            inter = cfg.moe_intermediate_size * cfg.n_shared_experts
            self.shared_experts = MLP(cfg.hidden_size, inter, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx, weight, aux = self.gate(x)
        y = self.experts(x.reshape(-1, x.shape[-1]), idx, weight).view_as(x)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y, aux
