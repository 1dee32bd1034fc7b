"""GPU checks (marked `gpu`, skipped without CUDA): grouped experts in bf16, every attention backend vs eager."""

import pytest
import torch
from helpers import FAMILIES, build_model, make_batch

from deepseek_vl2_lora.model.moe import RoutedExperts, grouped_mm_supported

pytestmark = pytest.mark.gpu


def _close(a, b, tol):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item() <= tol


def test_grouped_matches_loop_in_bf16_forward_and_grads():
    x0 = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    if not grouped_mm_supported(x0):
        pytest.skip("torch._grouped_mm has no bf16 kernel on this GPU")
    loop = RoutedExperts(16, 256, 128, kernel="loop").cuda().bfloat16()
    grouped = RoutedExperts(16, 256, 128, kernel="grouped").cuda().bfloat16()
    grouped.load_state_dict(loop.state_dict())
    idx = torch.randint(0, 15, (512, 4), device="cuda")  # expert 15 stays empty
    w = torch.rand(512, 4, device="cuda")
    results = []
    for m in (loop, grouped):
        x = x0.clone().requires_grad_(True)
        y = m(x, idx, w)
        y.float().pow(2).mean().backward()
        results.append((y, x.grad, m.gate_proj.grad, m.down_proj.grad))
    for a, b in zip(*results):
        assert _close(a, b, 2e-2)
    assert results[1][2][15].abs().sum() == 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["sdpa", "flash_attention_2"])
def test_backends_match_eager_on_gpu(family, impl):
    batch = {k: v.cuda() for k, v in make_batch(build_model(family).config).items()}
    real = batch["attention_mask"].bool()
    outs = []
    for name in ("eager", impl):
        model = build_model(family, attn_implementation=name).cuda().bfloat16().eval()
        with torch.no_grad():
            outs.append(model(**batch).logits[real])
    assert _close(outs[1], outs[0], 2e-2)


def test_flash_on_mla_uses_a_fused_kernel_not_math():
    """MLA's q/k 192 vs v 128: the flash path must run cuDNN or flash (V padded), never silently fall to math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from deepseek_vl2_lora.model.attention import flash_attention

    q = torch.randn(1, 4, 256, 192, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 4, 256, 128, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]):
        out = flash_attention(q, q, v, None, 192**-0.5)  # raises if no fused kernel can take it
    ref = (
        torch.softmax(
            (q.float() @ q.float().transpose(-1, -2)) * 192**-0.5
            + torch.full((256, 256), float("-inf"), device="cuda").triu(1),
            -1,
        )
        @ v.float()
    )
    assert _close(out, ref, 2e-2)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_on_flash_match_eager_on_gpu(family):
    """Packed rows (segment_ids): the flash backend's per-sample fused kernels vs eager's block mask, bf16,
    logits and the loss's gradients."""
    from test_packing import _run, _samples

    from deepseek_vl2_lora.data.collate import Collator

    cpu_model = build_model(family)
    batch = Collator(0, pack_length=64)(_samples(cpu_model.config))
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    results = []
    for name in ("eager", "flash_attention_2"):
        model = build_model(family, attn_implementation=name).cuda().bfloat16().train()
        out, grads = _run(model, batch)
        results.append((out.logits[batch["attention_mask"].bool()], grads))
    assert _close(results[1][0], results[0][0], 2e-2)
    for name, g in results[0][1].items():
        assert _close(results[1][1][name], g, 5e-2), name


def test_compiled_layers_match_eager_on_gpu():
    """trainer.compile_blocks on CUDA (inductor, bf16, grouped experts, fused attention)."""
    torch._dynamo.reset()
    model = build_model("full-noaux", attn_implementation="flash_attention_2").cuda().bfloat16().train()
    batch = {k: v.cuda() for k, v in make_batch(model.config).items()}
    out = model(**batch, return_logits=False)
    model.language.model.compile_layers()
    out_c = model(**batch, return_logits=False)
    assert _close(out_c.loss, out.loss, 1e-2)


@pytest.mark.parametrize("r", [4, 16])
def test_low_rank_expert_lora_grouped_matches_loop_in_bf16(r):
    """Routed-expert LoRA through the grouped kernel (rank padded to the 16-byte stride) vs the loop kernel."""
    from test_policy import _expert_lora_model

    results = []
    for kernel in ("loop", "grouped"):
        model = _expert_lora_model(kernel, r).cuda().bfloat16()
        batch = {k: v.cuda() for k, v in make_batch(model.config).items()}
        out = model(**batch, return_logits=False)
        out.loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if "experts" in n and p.grad is not None}
        results.append((out.loss.float(), grads))
    assert _close(results[1][0], results[0][0], 2e-2)
    assert results[0][1]
    for name, g in results[0][1].items():
        assert _close(results[1][1][name], g, 5e-2), name
