"""The activation-lean blocks (model/lean.py) and the recompute settings (model/recompute.py) against the forward
as it was before them, written out plainly here: routed experts as a per-expert loop with the official combine
(fp32 routing weight × expert output, summed over k), the SwiGLU MLP and RMSNorm as plain expressions, the loss
from full fp32 logits. In fp32, losses and every trainable gradient agree within 1e-6 relative for every policy
preset (and routed-expert LoRA through PEFT's own dense-delta forward), both expert kernels and every recompute
setting. What backward keeps is checked directly: saved tensors, and which ops run again in backward."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import build_model, make_batch
from torch.utils._python_dispatch import TorchDispatchMode

from deepseek_vl2_lora.model.lean import linear_cross_entropy, rms_norm, swiglu
from deepseek_vl2_lora.model.moe import MLP, RoutedExperts
from deepseek_vl2_lora.model.norm import RMSNorm
from deepseek_vl2_lora.policy.groups import apply_policy

PRESETS = Path(__file__).resolve().parents[1] / "deepseek_vl2_lora" / "configs" / "policy"
ACT = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


# ----------------------------------------------------------------------------------- the plain forward, written out
def plain_rms_norm(self, x):
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return self.weight * x32.to(dtype)


def plain_mlp(self, x):
    return self.down_proj(ACT[self.act](self.gate_proj(x)) * self.up_proj(x))


def plain_experts(self, x, idx, weight, lora=None):
    """Per expert: its token copies through down(act(gate(x)) · up(x)); then Σ_k weight · output in fp32."""
    assert not lora  # routed-expert LoRA runs through PEFT's dense-delta forward in the reference
    n, k = idx.shape
    y = torch.zeros(n, k, x.shape[-1], dtype=x.dtype)
    for e in range(self.n_experts):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        h = x[tok]
        out = F.linear(ACT[self.act](F.linear(h, self.gate_proj[e])) * F.linear(h, self.up_proj[e]), self.down_proj[e])
        y = y.index_put((tok, slot), out.to(y.dtype))
    return (y * weight.unsqueeze(-1)).sum(dim=1).to(x.dtype)


def plain_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))


@pytest.fixture
def plain_forward(monkeypatch):
    """Within the test: switch the model to the plain forms (call it) — they stay until the test ends."""

    def switch(model):
        from peft.tuners.lora.layer import ParamWrapper

        monkeypatch.setattr(RMSNorm, "forward", plain_rms_norm)
        monkeypatch.setattr(MLP, "forward", plain_mlp)
        monkeypatch.setattr(RoutedExperts, "forward", plain_experts)
        for m in model.modules():
            if isinstance(m, ParamWrapper) and "forward" in vars(m):
                del m.forward  # PEFT's own forward: the dense per-expert delta added to the weight

    return switch


# ------------------------------------------------------------------------------------------------ whole model
CASES = [
    ("tiny-mha", "mha_lora", {}),
    ("tiny-mha", "full_lm", {}),
    ("small-mla", "mla_lowrank", {}),
    ("small-mla", "mla_lowrank_lora", {}),
    ("full-noaux", "lora_o_mlp", {}),
    ("full-noaux", "full_lm", {}),
    ("full-noaux", "mla_lowrank_lora", {"routed_experts": {"mode": "lora", "r": 4, "alpha": 8}}),
]


def _policy(name, changes):
    cfg = yaml.safe_load((PRESETS / f"{name}.yaml").read_text())
    cfg["groups"].update(changes)
    return cfg


def _model(family, preset, changes, kernel="loop"):
    model = build_model(family, attn_implementation="sdpa", experts_kernel=kernel)
    apply_policy(model, _policy(preset, changes))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move every trainable tensor off its init (LoRA's B starts at zero)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.train()


def _loss_and_grads(model, batch, lean: bool):
    model.zero_grad(set_to_none=True)
    if lean:
        out = model(**batch, return_logits=False)
        loss = out.loss
    else:
        out = model(**batch)
        loss = plain_loss(out.logits, batch["labels"])
    (loss + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    ref, diff = b.norm(), (a - b).norm()
    return float(diff / ref) if ref > 0 else float(diff)


@pytest.mark.parametrize(
    "family,preset,changes", CASES, ids=[f"{c[0]}-{c[1]}{'+expert_lora' * bool(c[2])}" for c in CASES]
)
def test_lean_forward_equals_the_plain_forward_for_every_preset_kernel_and_recompute(
    family, preset, changes, plain_forward
):
    batch = make_batch(build_model(family).config)
    lean = {}
    for kernel in ("loop", "grouped"):
        model = _model(family, preset, changes, kernel)
        for recompute in ("none", "selective", "full"):
            model.language.model.recompute = recompute
            lean[kernel, recompute] = _loss_and_grads(model, batch, lean=True)
    reference = _model(family, preset, changes)
    plain_forward(reference)
    ref_loss, ref_grads = _loss_and_grads(reference, batch, lean=False)
    assert ref_grads and any(g.abs().sum() > 0 for g in ref_grads.values())
    for key, (loss, grads) in lean.items():
        assert relative_error(loss, ref_loss) <= 1e-6, key
        assert grads.keys() == ref_grads.keys(), key
        for name, g in ref_grads.items():
            assert relative_error(grads[name], g) <= 1e-6, (key, name, relative_error(grads[name], g))


def test_lean_bf16_error_is_no_worse_than_the_plain_bf16_error(plain_forward):
    """bf16-exact weights; fp32 truth from the plain forward on them. Median relative gradient error over the
    trainable tensors: the lean path's at most twice the plain path's (both bf16 autocast)."""
    model = _model("full-noaux", "lora_o_mlp", {"router": {"mode": "train"}}, kernel="grouped")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    batch = make_batch(model.config)

    def under_bf16(lean):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _loss_and_grads(model, batch, lean)

    lean_loss, lean_grads = under_bf16(True)
    plain_forward(model)
    true_loss, true_grads = _loss_and_grads(model, batch, lean=False)
    plain_loss_, plain_grads = under_bf16(False)

    def median_error(grads):
        return torch.tensor([relative_error(grads[n], g) for n, g in true_grads.items()]).median().item()

    assert median_error(lean_grads) <= 2 * median_error(plain_grads) + 1e-4
    assert relative_error(lean_loss, true_loss) <= 2 * relative_error(plain_loss_, true_loss) + 1e-4


# ---------------------------------------------------------------------------------------------- what is saved
def _saved_during(fn):
    """Tensors autograd saves for backward while `fn` runs (parameters excepted), as (shape, dtype)."""
    saved = []

    def pack(t):
        if not (isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter)):
            saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("kernel", ["loop", "grouped"])
def test_frozen_routed_experts_keep_only_gate_up_and_the_routing_weights(kernel):
    n, k, d, i, e = 40, 3, 48, 20, 5
    experts = RoutedExperts(e, d, i, kernel=kernel).requires_grad_(False)
    x = torch.randn(n, d, requires_grad=True)
    idx = torch.stack([torch.randperm(e)[:k] for _ in range(n)])
    w = torch.rand(n, k, requires_grad=True)
    out, saved = _saved_during(lambda: experts(x, idx, w))
    floats = [(s, dt) for s, dt in saved if dt.is_floating_point]
    # gate and up outputs [rows, I] (per expert in the loop kernel) and the fp32 per-copy routing weight: nothing
    # of width D (no input copy, no expert output), no fp32 [N, k, D] product
    assert all(s[-1] == i or len(s) == 1 for s, _ in floats), floats
    assert sum(torch.Size(s).numel() for s, _ in floats if len(s) == 2) == 2 * n * k * i
    assert sum(torch.Size(s).numel() for s, dt in floats if len(s) == 1 and dt == torch.float32) == n * k
    out.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_mlp_and_norm_keep_their_inputs_not_fp32_copies():
    mlp = MLP(48, 20).requires_grad_(False)
    x = torch.randn(7, 48, dtype=torch.bfloat16, requires_grad=True)
    mlp = mlp.to(torch.bfloat16)
    _, saved = _saved_during(lambda: mlp(x))
    assert sorted(saved) == [((7, 20), torch.bfloat16)] * 2  # gate and up outputs
    norm = RMSNorm(48).to(torch.bfloat16).requires_grad_(False)
    _, saved = _saved_during(lambda: norm(x))
    assert sorted(saved, key=str) == sorted([((7, 48), torch.bfloat16), ((7, 1), torch.float32)], key=str)


# --------------------------------------------------------------------------------------------- the functions
@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
def test_swiglu_and_rms_norm_equal_autograd_of_the_plain_expressions(act):
    gen = torch.Generator().manual_seed(0)
    g, u = (torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    scale = torch.rand(9, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    for s in (None, scale):
        ours = torch.autograd.grad(swiglu(g, u, act, s), [g, u] + ([s] if s is not None else []), grad)
        plain = ACT[act](g) * u * (1 if s is None else s[:, None])
        ref = torch.autograd.grad(plain, [g, u] + ([s] if s is not None else []), grad)
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # RMSNorm computes in fp32 by definition (x.float()): fp32 in, fp32 rounding of a reordered formula
    x = torch.randn(4, 3, 8, generator=gen, requires_grad=True)
    weight = torch.rand(8, generator=gen, requires_grad=True)
    grad = torch.randn(4, 3, 8, generator=gen)
    norm = RMSNorm(8, eps=1e-6)
    ours = torch.autograd.grad(rms_norm(x, weight, 1e-6), (x, weight), grad)
    norm.weight = torch.nn.Parameter(weight.detach().clone())
    ref = torch.autograd.grad(plain_rms_norm(norm, x), (x, norm.weight), grad)
    for a, b in zip(ours, ref, strict=True):
        assert relative_error(a, b) <= 1e-6


def test_swiglu_in_bf16_is_autograds_bit_for_bit():
    g, u = (torch.randn(16, 32, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    grad = torch.randn(16, 32, dtype=torch.bfloat16)
    ours = torch.autograd.grad(swiglu(g, u), (g, u), grad)
    ref = torch.autograd.grad(F.silu(g) * u, (g, u), grad)
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)


def test_linear_cross_entropy_equals_full_logits_in_chunks_and_without_grad():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=gen, requires_grad=True)
    w = torch.randn(50, 16, generator=gen, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=gen)
    ref = F.cross_entropy(h.double() @ w.double().T, t, reduction="sum")  # float64 truth
    ref_grads = torch.autograd.grad(3.0 * ref, (h, w))
    for chunk in (5, 37, 128):
        ours = linear_cross_entropy(h, w, t, chunk)
        assert relative_error(ours, ref) <= 1e-6
        for a, b in zip(torch.autograd.grad(3.0 * ours, (h, w)), ref_grads, strict=True):
            assert relative_error(a, b) <= 1e-6
    with torch.no_grad():
        assert relative_error(linear_cross_entropy(h, w, t, 8), ref) <= 1e-6


# --------------------------------------------------------------------------------------------------- recompute
class _OpsInBackward(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_selective_recomputes_the_attention_projections_and_never_the_kernel():
    """MHA: the CPU runs SDPA as its fused flash kernel (MLA's 192/128-style head dims take the math fallback on
    the CPU, which is plain matmuls; on a GPU cuDNN runs them fused)."""
    model = _model("tiny-mha", "mha_lora", {})
    batch = make_batch(model.config)
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    mm = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}
    counts = {}
    for recompute in ("none", "selective", "full"):
        model.language.model.recompute = recompute
        out = model(**batch, return_logits=False)
        mode = _OpsInBackward()
        with mode:
            (out.loss + out.aux_loss).backward()
        counts[recompute] = (mode.ops.count(kernel), sum(op in mm for op in mode.ops))
    layers = model.config.language.num_hidden_layers
    assert counts["none"][0] == counts["selective"][0] == 0  # the kernel's forward never runs in backward
    assert counts["full"][0] == layers  # whole-layer recompute runs it again
    assert counts["none"][1] < counts["selective"][1] < counts["full"][1]
