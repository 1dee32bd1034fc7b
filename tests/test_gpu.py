"""The GPU's fast paths in bf16, each judged against fp32 truth (deepseek_vl2_lora/agreement.py): the model is
built in bf16 (its weights exact in fp32), the fp32 result is computed on those same weights, and a fast path passes
when its error is at most 2x that of the plain eager bf16 path + 1e-3. Never bf16 against bf16 under a fixed
tolerance.

Every check runs on CUDA (marked `gpu`, skipped without one) and in bf16 on the CPU (default suite), where the
nearest CPU kernel stands in for a CUDA-only one: flash_attention_2 -> sdpa (packed rows: the same per-sample loop
of causal calls), inductor -> aot_eager (compiling on 2 cores costs minutes). `grouped` is torch._grouped_mm on
both (aten's CPU fallback)."""

import statistics
from contextlib import contextmanager

import pytest
import torch
from helpers import FAMILIES, build_model, make_batch

from deepseek_vl2_lora.model.moe import RoutedExperts, grouped_mm_supported
from deepseek_vl2_lora.training.agreement import in_fp32, overall_error, relative_error, tensor_errors, within

DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=pytest.mark.gpu)]
# The plain baseline runs the loop experts; a fast path the kernel the model picks (grouped on a GPU that has it).
KERNEL = {"eager": "loop", "sdpa": "auto", "flash_attention_2": "auto"}


def fused_backend(device: str) -> str:
    return "flash_attention_2" if device == "cuda" else "sdpa"


def on(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def assert_rule(name: str, err: float, baseline_err: float) -> None:
    assert within(err, baseline_err), f"{name}: error {err:.3g} vs fp32, plain bf16's {baseline_err:.3g}"


def assert_grads_rule(grads: dict, baseline: dict, truth: dict) -> None:
    """Gradients of many tensors, aggregated: the median of the per-tensor errors and the error of all of them
    together. (Per tensor, a router weight's gradient is decided by discrete top-k choices that bf16 rounding
    flips token by token, differently in each path: one flip moves that row by O(1), so its error measures luck.
    A fault in a kernel moves every tensor downstream of it, which both aggregates see.)"""
    errors, base = tensor_errors(grads, truth), tensor_errors(baseline, truth)
    worst = max(errors, key=errors.get)
    assert_rule(
        f"median gradient (worst {worst}: {errors[worst]:.3g}, plain {base[worst]:.3g})",
        statistics.median(errors.values()),
        statistics.median(base.values()),
    )
    assert_rule("all gradients together", overall_error(grads, truth), overall_error(baseline, truth))


@contextmanager
def plain_kernels(model):
    """The model with the plain kernels (eager attention, loop experts) for the duration: the baseline path, and
    the kernels its fp32 truth runs on (the fused and grouped ones take bf16 only, on a GPU)."""
    attention = [m for m in model.modules() if hasattr(m, "backend") and hasattr(m, "o_proj")]
    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    saved = [m.backend for m in attention], [m.kernel for m in experts]
    for m in attention:
        m.backend = "eager"
    for m in experts:
        m.kernel = "loop"
    try:
        yield model
    finally:
        for m, backend in zip(attention, saved[0]):
            m.backend = backend
        for m, kernel in zip(experts, saved[1]):
            m.kernel = kernel


def forward_backward(model, batch, return_logits=True):
    """(logits at real positions or None, loss, {name: fp32 gradient}) of one loss backward."""
    from test_packing import _run

    out, grads = _run(model, batch, return_logits)
    logits = out.logits[batch["attention_mask"].bool()].float() if return_logits else None
    return logits, out.loss.float(), {n: g.float() for n, g in grads.items()}


# ---------------------------------------------------------------------------------------------------- experts
@pytest.mark.parametrize("device", DEVICES)
def test_grouped_experts_are_as_close_to_fp32_as_the_loop(device):
    x0 = torch.randn(512, 256, device=device, dtype=torch.bfloat16)
    if not grouped_mm_supported(x0):
        pytest.skip("torch._grouped_mm has no bf16 kernel on this GPU")
    experts = RoutedExperts(16, 256, 128).to(device).bfloat16()
    idx = torch.randint(0, 15, (512, 4), device=device)  # expert 15 stays empty
    w = torch.rand(512, 4, device=device)

    def run(kernel, dtype):
        experts.kernel = kernel
        x = x0.to(dtype).clone().requires_grad_(True)
        experts.zero_grad(set_to_none=True)
        y = experts(x, idx, w)
        y.float().pow(2).mean().backward()
        return [t.float() for t in (y, x.grad, experts.gate_proj.grad, experts.down_proj.grad)]

    with in_fp32(experts):
        truth = run("loop", torch.float32)
    loop, grouped = run("loop", torch.bfloat16), run("grouped", torch.bfloat16)
    for name, t, a, b in zip(("output", "input grad", "gate_proj grad", "down_proj grad"), truth, loop, grouped):
        assert_rule(name, relative_error(b, t), relative_error(a, t))
    assert grouped[2][15].abs().sum() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("r", [4, 16])
def test_low_rank_expert_lora_grouped_is_as_close_to_fp32_as_the_loop(device, r):
    """Routed-expert LoRA through the grouped kernel (rank padded to the 16-byte stride) vs the loop kernel."""
    from test_policy import _expert_lora_model

    model = _expert_lora_model("loop", r).to(device).bfloat16()
    batch = on(make_batch(model.config), device)
    experts = [m for m in model.modules() if isinstance(m, RoutedExperts)]

    def run(kernel):
        for m in experts:
            m.kernel = kernel
        _, loss, grads = forward_backward(model, batch, return_logits=False)
        return loss, {n: g for n, g in grads.items() if "experts" in n}

    with in_fp32(model):
        truth_loss, truth = run("loop")
    (loop_loss, loop), (grouped_loss, grouped) = run("loop"), run("grouped")
    assert truth and loop.keys() == truth.keys()
    assert_rule("loss", relative_error(grouped_loss, truth_loss), relative_error(loop_loss, truth_loss))
    assert_grads_rule(grouped, loop, truth)


# -------------------------------------------------------------------------------------------------- attention
BACKEND_CASES = [
    pytest.param("cpu", "sdpa"),
    pytest.param("cuda", "sdpa", marks=pytest.mark.gpu),
    pytest.param("cuda", "flash_attention_2", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("device", "impl"), BACKEND_CASES)
def test_backends_are_as_close_to_fp32_as_eager(family, device, impl):
    batch = on(make_batch(build_model(family).config), device)
    real = batch["attention_mask"].bool()
    logits = {}
    for name in ("eager", impl):
        model = build_model(family, attn_implementation=name, experts_kernel=KERNEL[name]).to(device).bfloat16().eval()
        with torch.no_grad():
            if name == "eager":
                with in_fp32(model):
                    logits["truth"] = model(**batch).logits[real].float()
            logits[name] = model(**batch).logits[real].float()
    truth = logits["truth"]
    assert_rule(impl, relative_error(logits[impl], truth), relative_error(logits["eager"], truth))


@pytest.mark.gpu
def test_flash_on_mla_uses_a_fused_kernel_not_math():
    """MLA's q/k 192 vs v 128: the flash path must run cuDNN or flash (V padded), never silently fall to math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from deepseek_vl2_lora.model.attention import eager_attention, flash_attention

    q = torch.randn(1, 4, 256, 192, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 4, 256, 128, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        out = flash_attention(q, q, v, None, 192**-0.5)  # raises if no fused kernel can take it
    causal = torch.full((256, 256), float("-inf"), device="cuda").triu(1)
    truth = torch.softmax((q.double() @ q.double().transpose(-1, -2)) * 192**-0.5 + causal.double(), -1) @ v.double()
    plain = eager_attention(q, q, v, None, 192**-0.5)
    assert_rule("flash", relative_error(out, truth), relative_error(plain, truth))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_on_the_fused_backend_are_as_close_to_fp32_as_eager(device, family):
    """Packed rows (segment_ids), bf16, every parameter trained: the fused backend's per-sample calls vs eager's
    block mask, logits and the loss's gradients, each against eager in fp32 on the same weights."""
    from test_packing import _samples

    from deepseek_vl2_lora.data.collate import Collator

    batch = on(Collator(0, pack_length=64)(_samples(build_model(family).config)), device)
    results = {}
    for name in ("eager", fused_backend(device)):
        model = build_model(family, attn_implementation=name, experts_kernel=KERNEL[name]).to(device).bfloat16().train()
        if name == "eager":
            with in_fp32(model):
                results["truth"] = forward_backward(model, batch)
        results[name] = forward_backward(model, batch)
    (truth_logits, _, truth), (eager_logits, _, eager) = results["truth"], results["eager"]
    fused_logits, _, fused = results[fused_backend(device)]
    assert_rule("logits", relative_error(fused_logits, truth_logits), relative_error(eager_logits, truth_logits))
    assert_grads_rule(fused, eager, truth)


def test_the_rule_catches_a_real_fault():
    """The rule can fail: packed rows whose samples see each other (the classic packing bug: positions and labels
    right, the per-sample attention mask lost) are caught, on the CPU in bf16, where the correct fused path passes
    (the test above). A fault far below bf16's noise (a softmax scale 3% off in one layer of random weights moves
    the logits by 0.1%) is invisible to any bf16 comparison: the fp32 equality tests are for those."""
    from test_packing import _samples

    from deepseek_vl2_lora.data.collate import Collator
    from deepseek_vl2_lora.model.attention import positions_from_segments, segment_starts

    batch = Collator(0, pack_length=64)(_samples(build_model("tiny-mha").config))
    leaking = {k: v for k, v in batch.items() if k != "segment_ids"}
    leaking["position_ids"] = positions_from_segments(batch["segment_ids"])
    leaking["labels"] = batch["labels"].masked_fill(segment_starts(batch["segment_ids"]), -100)
    model = build_model("tiny-mha", attn_implementation="sdpa").bfloat16().train()
    with in_fp32(model):
        truth_logits, _, truth = forward_backward(model, batch)
    plain_logits, _, plain = forward_backward(model, batch)
    wrong_logits, _, wrong = forward_backward(model, leaking)
    with pytest.raises(AssertionError, match="logits"):
        assert_rule("logits", relative_error(wrong_logits, truth_logits), relative_error(plain_logits, truth_logits))
    with pytest.raises(AssertionError, match="gradient"):
        assert_grads_rule(wrong, plain, truth)


# ---------------------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_layers_are_as_close_to_fp32_as_eager(device):
    """trainer.compile_blocks with the fast kernels (grouped experts, fused attention): inductor on CUDA, aot_eager
    on the CPU; the baseline is the plain path, not compiled."""
    torch._dynamo.reset()
    model = build_model("full-noaux", attn_implementation=fused_backend(device), experts_kernel="grouped")
    model = model.to(device).bfloat16().train()
    batch = on(make_batch(model.config), device)
    with plain_kernels(model), in_fp32(model):
        _, truth_loss, truth = forward_backward(model, batch, return_logits=False)
    with plain_kernels(model):
        _, plain_loss, plain = forward_backward(model, batch, return_logits=False)
    model.language.model.compile_layers(**({} if device == "cuda" else {"backend": "aot_eager"}))
    _, compiled_loss, compiled = forward_backward(model, batch, return_logits=False)
    assert_rule("loss", relative_error(compiled_loss, truth_loss), relative_error(plain_loss, truth_loss))
    assert_grads_rule(compiled, plain, truth)
