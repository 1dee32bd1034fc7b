"""The quantized frozen base (model/quant.py, policy/quantize.py): storage against a plain-PyTorch decode, NF4's
error on Gaussian weights, loading slice by slice, compute against the dequantized weights, what autograd keeps,
the loader's memory, which weights a policy leaves quantized, config errors, and the eval loss of the tiny family."""

import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from helpers import FAMILIES, build_model, make_batch
from test_train_config import compose_cfg

from deepseek_vl2_lora.data.processor import DeepseekVL2Processor
from deepseek_vl2_lora.evaluation.eval_set import evaluate
from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM
from deepseek_vl2_lora.model import checkpoint as checkpoint_mod
from deepseek_vl2_lora.model.moe import RoutedExperts
from deepseek_vl2_lora.model.quant import (
    QuantizedTensor,
    QuantLinear,
    bitsandbytes,
    quantize_modules_,
    quantized_weights,
)
from deepseek_vl2_lora.model.tiny import ensure_tiny_checkpoint
from deepseek_vl2_lora.policy.groups import PolicyError, apply_policy
from deepseek_vl2_lora.policy.quantize import keep_unquantized
from deepseek_vl2_lora.training.config import ConfigError, as_train_config, check_config
from deepseek_vl2_lora.training.preflight import eval_datasets

# The 16 NF4 levels (Dettmers et al. 2023, QLoRA, appendix E): quantiles of N(0, 1) scaled to [-1, 1].
NF4 = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0]
)  # fmt: skip


def reference_decode(q: QuantizedTensor) -> torch.Tensor:
    """The stored codes decoded in plain PyTorch (fp32): code value × its block's scale, blocks over the flat
    tensor; nf4 packs two codes a byte, high nibble first, and stores its block scales 8-bit around their mean."""
    n = q.numel()
    if q.kind == "int8":
        return (q.code[q.packed.long()] * q.absmax.repeat_interleave(256)[:n]).view(q.shape)
    nested = q.absmax_scale.repeat_interleave(256)[: q.absmax_q.numel()]
    scales = q.absmax_code[q.absmax_q.long()] * nested + q.absmax_offset
    codes = torch.stack([q.packed >> 4, q.packed & 15], dim=1).reshape(-1)[:n].long()
    return (NF4[codes] * scales.repeat_interleave(64)[:n]).view(q.shape)


def quantized(w: torch.Tensor, kind: str = "nf4") -> QuantizedTensor:
    q = QuantizedTensor(w.shape, kind)
    q.store_(w)
    return q


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------------------------------ storage
# (4, 64, 32), (8, 96), (64, 1280, 32): bitsandbytes 0.50.2's CPU kernel decodes these wrongly unless the shape is
# flat (last dim a multiple of 16, not of 64, several rows); (3, 5, 24): a partial last block.
@pytest.mark.parametrize("shape", [(4, 64, 32), (8, 96), (64, 1280, 32), (3, 5, 24), (2, 128, 64)])
@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_dequantize_equals_a_plain_pytorch_decode(shape, kind):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    q = quantized(w, kind)
    expected = reference_decode(q)
    torch.testing.assert_close(q.dequantize(torch.float32), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(q.dequantize(torch.bfloat16), expected.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("kind,low,high", [("nf4", 0.08, 0.10), ("int8", 0.008, 0.014)])
def test_quantization_error_on_gaussian_weights_is_the_formats_own(kind, low, high):
    """NF4 with blocks of 64 keeps about 91 % of a Gaussian weight (relative Frobenius error ~0.09; QLoRA's format),
    8-bit blockwise about 99 %; per tensor, whatever its layout."""
    for shape in [(8, 256, 512), (1408, 2048)]:
        w = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
        assert low < rel_error(quantized(w, kind).dequantize(torch.float32), w.float()) < high


@pytest.mark.parametrize("shape", [(6, 64, 96), (3, 5, 24)])  # slices on block boundaries, and not
def test_loading_slice_by_slice_is_bit_equal_to_quantizing_the_whole(shape):
    bnb = bitsandbytes()
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 0.02).to(torch.bfloat16)
    q = QuantizedTensor(shape, "nf4")
    for e in [2, 0, 1, *range(3, shape[0])]:
        assert not q.complete
        q.store_(w[e], e)
    assert q.complete
    codes, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(q.packed, codes.view(-1)) and torch.equal(q.absmax_q, state.absmax)
    assert torch.equal(q.absmax_scale, state.state2.absmax) and torch.equal(q.absmax_offset, state.offset)


def test_dtype_casts_leave_the_codes_and_scales_alone():
    model = build_model("full-noaux")
    quantize_modules_(model, "nf4")
    before = {k: v.clone() for k, v in model.state_dict().items() if ".weight_q." in k or "experts." in k}
    model.to(torch.bfloat16)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    assert model.language.model.norm.weight.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ compute
def _dequantized_twin(model):
    """A copy of `model` with plain weights equal to the quantized model's dequantized ones (fp32)."""
    twin = build_model("full-noaux", experts_kernel=model.language.model.layers[1].mlp.experts.kernel)
    state = {k: v for k, v in model.state_dict().items() if k in twin.state_dict()}
    for name, q in quantized_weights(model).items():
        state[name] = q.dequantize(torch.float32)
    twin.load_state_dict(state, strict=True)
    return twin


@pytest.mark.parametrize("kernel", ["loop", "grouped"])
def test_quantized_model_computes_with_its_dequantized_weights(kernel):
    """Forward, loss and the trained tensors' gradients equal those of the same model holding the dequantized
    weights as plain parameters (fp32: the same values through a different code path)."""
    model = build_model("full-noaux", experts_kernel=kernel)
    quantize_modules_(model, "nf4", keep_unquantized({"name": "p", "groups": {"kv_low_rank": {"mode": "train"}}}, True))
    twin = _dequantized_twin(model)
    batch = make_batch(model.config)
    grads = []
    for m in (model, twin):
        apply_policy(m, {"name": "p", "groups": {"kv_low_rank": {"mode": "train"}, "o_proj": {"mode": "lora"}}})
        for p in m.parameters():  # LoRA B starts at 0: make the adapters do something
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(3))
        m.train()
        out = m(**batch)
        (out.loss + out.aux_loss).backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
        grads[-1]["logits"] = out.logits.detach()
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, rtol=1e-4, atol=1e-6, msg=name)


def _saved_shapes(fn) -> list[tuple]:
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        fn()
    return shapes


def test_autograd_keeps_no_dequantized_weight_and_backward_reads_it_again():
    """The dequantized copy lives for one matmul: nothing of its shape is saved for backward, and the input's
    gradient (recomputed from the codes) equals the plain one, in fp32 and under bf16 autocast."""
    w = torch.randn(40, 48) * 0.05
    layer = QuantLinear(48, 40, "nf4")
    layer.weight_q.store_(w)
    plain = layer.weight_q.dequantize(torch.float32)
    for autocast in (False, True):
        x = torch.randn(5, 7, 48, requires_grad=True)
        xr = x.detach().clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            shapes = _saved_shapes(lambda x=x: layer(x).square().sum().backward())
            F.linear(xr, plain).square().sum().backward()
        assert (40, 48) not in shapes and (48, 40) not in shapes
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-7)
    experts = RoutedExperts(4, 48, 24, kernel="grouped")
    for name in ("gate_proj", "up_proj", "down_proj"):
        q = QuantizedTensor(getattr(experts, name).shape, "nf4")
        q.store_(getattr(experts, name).detach())
        del experts._parameters[name]
        experts.add_module(name, q)
    x = torch.randn(9, 48, requires_grad=True)
    idx = torch.randint(0, 4, (9, 2))
    shapes = _saved_shapes(lambda: experts(x, idx, torch.rand(9, 2)).sum().backward())
    assert not {(4, 24, 48), (4, 48, 24)} & set(shapes)
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------------ loading
def test_from_pretrained_quantizes_tensor_by_tensor_and_never_holds_the_weights_whole(tmp_path, monkeypatch):
    """A sharded tiny checkpoint (experts split over shards): while loading, the full-precision tensors alive at
    once are at most the ones kept unquantized plus the tensor being read; the result equals quantizing the file's
    weights directly; the trained MLA paths stay unquantized."""
    src = DeepseekVL2ForCausalLM.from_pretrained(ensure_tiny_checkpoint("full-noaux"))
    src.save_pretrained(tmp_path / "ckpt", max_shard_size=40_000)
    assert len(list((tmp_path / "ckpt").glob("model-*.safetensors"))) >= 10
    live, peak = {}, [0]
    real_open = checkpoint_mod.safe_open

    class Watched:
        def __init__(self, *a, **k):
            self.fh = real_open(*a, **k)

        def __enter__(self):
            self.fh.__enter__()
            return self

        def __exit__(self, *exc):
            return self.fh.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def get_tensor(self, key):
            t = self.fh.get_tensor(key)
            live[key] = t.numel() * t.element_size()
            peak[0] = max(peak[0], sum(live.values()))
            weakref.finalize(t, live.pop, key, None)
            return t

    monkeypatch.setattr(checkpoint_mod, "safe_open", Watched)
    policy = {"name": "mla_lowrank", "groups": {"q_low_rank": {"mode": "train"}, "kv_low_rank": {"mode": "train"}}}
    keep = keep_unquantized(policy, use_mla=True)
    model = DeepseekVL2ForCausalLM.from_pretrained(tmp_path / "ckpt", quantize="nf4", keep_unquantized=keep)
    stored = quantized_weights(model)
    source = src.state_dict()
    assert set(stored) == {
        n for n in source if ".layers." in n and (".mlp." in n and ".mlp.gate." not in n or ".o_proj." in n)
    }
    kept = sum(t.numel() * t.element_size() for n, t in source.items() if n not in stored)
    largest = max(t.numel() * t.element_size() for t in source.values())
    assert peak[0] <= kept + largest
    for name, q in stored.items():
        assert torch.equal(q.dequantize(torch.float32), quantized(source[name]).dequantize(torch.float32)), name
    loaded = model.state_dict()
    assert all(torch.equal(loaded[n], t) for n, t in source.items() if n not in stored)
    with pytest.raises(ValueError, match="merge the trained state into the base checkpoint"):
        model.save_pretrained(tmp_path / "again")


# ------------------------------------------------------------------------------------------------ policy, config
def _cfg(*overrides):
    return as_train_config(compose_cfg(*overrides))


@pytest.mark.parametrize(
    "overrides,match",
    [
        (("model.quantize=nf4", "policy=full_lm"), "stores mlp_dense, shared_experts, routed_experts quantized"),
        (("model.quantize=nf4", "dist=zero3"), "ZeRO-3 shards parameters, not the quantized weights.*dist=zero2"),
        (("model.quantize=int8", "model.quantize_lm_head=true", "policy.groups.lm_head.mode=train"), "lm_head"),
        (("model.quantize_lm_head=true",), "needs model.quantize=nf4 or int8"),
        (("model.quantize=nf3",), r"model.quantize='nf3': expected one of none, nf4, int8"),
    ],
)
def test_configs_that_cannot_work_with_a_quantized_base_are_one_line_errors(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        check_config(_cfg(*overrides))
    assert "\n" not in str(err.value)


def test_config_accepts_every_preset_that_leaves_the_quantized_groups_frozen():
    for policy in ("mla_lowrank", "mla_lowrank_lora", "lora_o_mlp", "mha_lora"):
        check_config(_cfg("model.quantize=nf4", f"policy={policy}", "dist=zero2"))


def test_a_policy_that_trains_or_reads_a_quantized_group_is_a_policy_error():
    model = build_model("full-noaux")
    quantize_modules_(model, "nf4")  # everything quantizable: the MLA paths too
    with pytest.raises(PolicyError, match="trains group kv_low_rank in full, but its weights are stored quantized"):
        apply_policy(model, {"name": "mla_lowrank", "groups": {"kv_low_rank": {"mode": "train"}}})
    with pytest.raises(PolicyError, match="dora=True.*reads the base weight"):
        apply_policy(model, {"name": "d", "groups": {"o_proj": {"mode": "lora", "dora": True}}})
    report = apply_policy(model, {"name": "q", "groups": {"o_proj": {"mode": "lora"}}})
    rows = {r.group: r for r in report.groups}
    dense = build_model("full-noaux")
    assert report.total_params == sum(p.numel() for p in dense.parameters()) + sum(
        p.numel() for n, p in model.named_parameters() if "lora_" in n
    )
    assert "base nf4" in rows["o_proj"].note and rows["o_proj"].trainable > 0


# ------------------------------------------------------------------------------------------------ quality
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantized_eval_loss_before_training_is_within_2_percent_of_full_precision(family, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_VL2_LORA_CACHE", str(tmp_path.parent / "tiny_cache"))
    path = ensure_tiny_checkpoint(family)
    processor = DeepseekVL2Processor.from_pretrained(path)
    loss_set, _ = eval_datasets(compose_cfg().data, processor)
    losses = {}
    for quantize in ("none", "nf4", "int8"):
        model = DeepseekVL2ForCausalLM.from_pretrained(path, quantize=quantize)
        losses[quantize] = evaluate(model, processor, loss_set, None, torch.device("cpu"), 32, 1, limit=32).loss
    for quantize in ("nf4", "int8"):
        assert math.isfinite(losses[quantize]) and losses[quantize] == pytest.approx(losses["none"], rel=0.02)
