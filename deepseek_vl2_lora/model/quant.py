"""Frozen language-model weights stored quantized and dequantized just in time for each matmul (`model.quantize`).

- `nf4`: bitsandbytes' 4-bit NormalFloat in blocks of 64 with double quantization (the fp32 block scales are stored
  8-bit in blocks of 256, one fp32 scale each, around their mean): QLoRA's recipe, 4.127 bits per weight.
- `int8`: bitsandbytes' 8-bit dynamic code in blocks of 256, one fp32 scale each: 8.125 bits per weight.

Storage: a `QuantizedTensor` module whose whole state is plain buffers (codes, scales, code table), so `.to`,
`to_empty`, `state_dict` and fake tensors (the dry-run plan builds them empty on `meta`) all see it. A dtype cast of
the model (`model.to(torch.bfloat16)`, DeepSpeed's `module.bfloat16()`) leaves the fp32 scales as they are.
A stacked `[E, out, in]` expert weight is one tensor, quantized expert by expert while loading (bit-equal to
quantizing it whole) and dequantized whole, once per projection and layer, for both expert kernels.

Compute: `QuantLinear` (an nn.Linear with a quantized weight) and the stacked routed experts go through autograd
Functions that dequantize the weight into the compute dtype (bf16 under bf16 autocast, else the input's), use it for
one matmul and drop it; backward dequantizes it again instead of keeping it. Only the input gets a gradient: a
quantized weight is frozen by construction.

Dequantizing always runs on a flat shape, then views: bitsandbytes 0.50.2's CPU (AVX-512) 4-bit kernel decodes
wrongly when the last dim is a multiple of 16 but not of the block size and there is more than one row (e.g. the tiny
family's `[E, 64, 32]` down_proj). tests/test_quant.py decodes against plain PyTorch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

QUANT_KINDS = ("none", "nf4", "int8")
BLOCK = {"nf4": 64, "int8": 256}
NESTED_BLOCK = 256  # nf4: the block scales are themselves quantized 8-bit in blocks of this many


def bitsandbytes():
    """`bitsandbytes.functional` (imported without its Hub kernel lookup: see _compat.py); it registers the
    `torch.ops.bitsandbytes` ops used here, with their fake kernels."""
    try:
        import bitsandbytes.functional as bnb_functional
    except ImportError:
        raise ImportError(
            "model.quantize needs bitsandbytes: pip install 'bitsandbytes==0.50.2' (in the same command as "
            "torch==2.13.0, or pip resolves another torch)"
        ) from None
    return bnb_functional


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` runs in: autocast's when it is on for x's device, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class QuantizedTensor(nn.Module):
    """A frozen weight of `shape` stored as `kind` (nf4 | int8) codes in buffers; `dequantize` gives it back."""

    def __init__(self, shape, kind: str, device=None):
        super().__init__()
        if kind not in BLOCK:
            raise ValueError(f"quantization {kind!r}; expected one of {', '.join(BLOCK)}")
        self.shape, self.kind = tuple(shape), kind
        self.block = BLOCK[kind]
        n = math.prod(self.shape)
        blocks = -(-n // self.block)
        u8, f32 = {"dtype": torch.uint8, "device": device}, {"dtype": torch.float32, "device": device}
        if kind == "nf4":
            self.register_buffer("packed", torch.empty((n + 1) // 2, **u8))  # two 4-bit codes a byte, high first
            self.register_buffer("absmax_q", torch.empty(blocks, **u8))  # block scales, 8-bit
            self.register_buffer("absmax_scale", torch.empty(-(-blocks // NESTED_BLOCK), **f32))
            self.register_buffer("absmax_offset", torch.empty((), **f32))
            self.register_buffer("absmax_code", torch.empty(256, **f32))
        else:
            self.register_buffer("packed", torch.empty(n, **u8))
            self.register_buffer("absmax", torch.empty(blocks, **f32))
            self.register_buffer("code", torch.empty(256, **f32))
        self._staged: dict | None = None  # while loading slice by slice
        self.filled = False  # every value stored (by store_; a plan's or an uninitialised copy never is)

    # ------------------------------------------------------------------------------------------- storage
    def numel(self) -> int:
        return math.prod(self.shape)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"{self.kind}, shape={self.shape}"

    def _apply(self, fn, recurse=True):
        # Device moves and to_empty apply; a dtype cast of the model must not touch the codes or the fp32 scales.
        for key, buf in self._buffers.items():
            moved = fn(buf)
            self._buffers[key] = moved if moved.dtype == buf.dtype else buf.to(device=moved.device)
        return self

    def _slices_aligned(self) -> bool:
        """Whether each slice `[i]` of a stacked tensor starts on a block boundary (then it has its own blocks)."""
        return len(self.shape) == 3 and math.prod(self.shape[1:]) % self.block == 0

    @property
    def complete(self) -> bool:
        return self.filled and self._staged is None

    @torch.no_grad()
    def store_(self, w: torch.Tensor, index: int | None = None) -> None:
        """Quantize `w` into the buffers: the whole tensor, or slice `index` of a stacked one (slices in any order;
        the nf4 scales are finished when the last slice is in, bit-equal to quantizing the whole at once)."""
        bnb = bitsandbytes()
        expected = self.shape if index is None else self.shape[1:]
        if tuple(w.shape) != expected:
            raise ValueError(f"quantized weight {self.shape}: got {tuple(w.shape)} for slice {index}")
        parts = 1 if index is None else self.shape[0]
        staged = self._staged or {"done": set(), "raw": {}, "absmax": None}
        self._staged = staged
        if index is not None and not self._slices_aligned():  # slices share blocks: quantize once all are in
            staged["raw"][index] = w.detach().clone()
            staged["done"].add(index)
            if len(staged["done"]) == parts:
                self._staged = None
                self.store_(torch.stack([staged["raw"][i] for i in range(parts)]))
            return
        start = (index or 0) * math.prod(expected)
        flat = w.detach().to(self.packed.device).contiguous().reshape(-1)
        if self.kind == "nf4":
            codes, state = bnb.quantize_4bit(flat, blocksize=self.block, quant_type="nf4", compress_statistics=False)
            self.packed[start // 2 : start // 2 + codes.numel()].copy_(codes.view(-1))
            if staged["absmax"] is None:
                staged["absmax"] = torch.empty(self.absmax_q.shape, dtype=torch.float32, device=self.packed.device)
            staged["absmax"][start // self.block : start // self.block + state.absmax.numel()].copy_(state.absmax)
        else:
            codes, state = bnb.quantize_blockwise(flat, blocksize=self.block)
            self.packed[start : start + codes.numel()].copy_(codes)
            self.absmax[start // self.block : start // self.block + state.absmax.numel()].copy_(state.absmax)
            self.code.copy_(state.code)
        staged["done"].add(index)
        if len(staged["done"]) < parts:
            return
        if self.kind == "nf4":  # double quantization, as bitsandbytes' compress_statistics does it
            absmax = staged["absmax"]
            offset = absmax.mean()
            absmax_q, nested = bnb.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCK)
            self.absmax_q.copy_(absmax_q)
            self.absmax_scale.copy_(nested.absmax)
            self.absmax_code.copy_(nested.code)
            self.absmax_offset.copy_(offset)
        self._staged = None
        self.filled = True

    # ------------------------------------------------------------------------------------------- decoding
    def _block_scales(self) -> torch.Tensor:
        """The fp32 scale of every block (nf4: decoded from their 8-bit codes)."""
        if self.kind == "int8":
            return self.absmax
        scales = torch.ops.bitsandbytes.dequantize_blockwise(
            self.absmax_q, self.absmax_scale, self.absmax_code, NESTED_BLOCK, torch.float32
        )
        return scales + self.absmax_offset

    @torch.compiler.disable  # inductor mis-lowers bitsandbytes' CPU op; compiled layers call it eagerly
    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in `dtype`, as a new tensor (decoded flat, then viewed: see the module docstring)."""
        bitsandbytes()  # registers torch.ops.bitsandbytes
        n = self.numel()
        scales = self._block_scales()
        if self.kind == "nf4":
            w = torch.ops.bitsandbytes.dequantize_4bit(self.packed, scales, self.block, "nf4", [n], dtype)
        else:
            w = torch.ops.bitsandbytes.dequantize_blockwise(self.packed, scales, self.code, self.block, dtype)
        return w.view(self.shape)


# ------------------------------------------------------------------------------------------------ compute
class _DequantizedLinear(torch.autograd.Function):
    """x @ Wᵀ with W dequantized for this matmul only; backward dequantizes it again (nothing kept)."""

    @staticmethod
    def forward(ctx, x, weight: QuantizedTensor):
        ctx.weight = weight
        return F.linear(x, weight.dequantize(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad.matmul(ctx.weight.dequantize(grad.dtype)), None


class _DequantizedGroupedMM(torch.autograd.Function):
    """The grouped GEMM of token groups `offs` with the stacked experts, dequantized per call as above."""

    @staticmethod
    def forward(ctx, x, weight: QuantizedTensor, offs, gmm):
        ctx.weight, ctx.gmm = weight, gmm
        ctx.save_for_backward(offs)
        return gmm(x, weight.dequantize(x.dtype).transpose(-2, -1), offs)

    @staticmethod
    def backward(ctx, grad):
        (offs,) = ctx.saved_tensors
        return ctx.gmm(grad.contiguous(), ctx.weight.dequantize(grad.dtype), offs), None, None, None


def dequantized_linear(x: torch.Tensor, weight: QuantizedTensor) -> torch.Tensor:
    """F.linear(x, weight) in the compute dtype (x cast to it, as autocast would)."""
    return _DequantizedLinear.apply(x.to(compute_dtype(x)), weight)


def dequantized_grouped_mm(x: torch.Tensor, weight: QuantizedTensor, offs: torch.Tensor, gmm) -> torch.Tensor:
    """gmm(x, weightᵀ per expert, offs) with `weight` [E, out, in] dequantized in x's dtype for the call."""
    return _DequantizedGroupedMM.apply(x, weight, offs, gmm)


class QuantLinear(nn.Module):
    """A frozen nn.Linear whose weight is a QuantizedTensor (`weight_q`); the bias, if any, stays a frozen tensor."""

    def __init__(self, in_features: int, out_features: int, kind: str, bias=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_q = QuantizedTensor((out_features, in_features), kind, device)
        self.register_parameter("bias", bias)

    @property
    def qweight(self) -> torch.Tensor:
        """The packed codes: where PEFT looks up a quantized base layer's device (its LoRA layers go there)."""
        return self.weight_q.packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = dequantized_linear(x, self.weight_q)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ------------------------------------------------------------------------------------------------ the model
def _quantized(p: torch.Tensor, device, make):
    q = make(p.device if device is None else torch.device(device))
    if not p.is_meta:
        (q.weight_q if isinstance(q, QuantLinear) else q).store_(p)
    return q


def quantize_modules_(model: nn.Module, kind: str, keep=None, lm_head: bool = False, device=None) -> list[str]:
    """Store the language model's frozen matmul weights quantized, in place: every nn.Linear of the decoder layers
    (attention projections, dense MLP, shared experts), the stacked routed experts (3-D parameters) and, with
    `lm_head`, the output projection; not the weights whose parameter name `keep(name)` is true (e.g. those a policy
    trains in full). Loaded weights are quantized now; meta ones get empty storage on `device` (default: theirs) for
    the loader, or the plan, to fill. Returns the names of the quantized weights."""
    if kind == "none":
        return []
    keep = keep or (lambda name: False)
    targets = [(f"language.model.layers.{n}" if n else "language.model.layers", m)
               for n, m in model.language.model.layers.named_modules()]  # fmt: skip
    if lm_head:
        targets.append(("language.lm_head", model.language.lm_head))
    done = []
    for path, module in targets:
        if isinstance(module, nn.Linear):
            if keep(f"{path}.weight"):
                continue
            bias = module.bias
            if bias is not None:
                bias.requires_grad_(False)

            def make(dev, m=module, bias=bias):
                return QuantLinear(m.in_features, m.out_features, kind, bias, dev)

            parent, _, leaf = path.rpartition(".")
            setattr(model.get_submodule(parent), leaf, _quantized(module.weight, device, make))
            done.append(f"{path}.weight")
            continue
        for leaf, p in list(module.named_parameters(recurse=False)):
            if p.dim() != 3 or keep(f"{path}.{leaf}"):
                continue

            def make(dev, shape=p.shape):
                return QuantizedTensor(shape, kind, dev)

            q = _quantized(p, device, make)
            del module._parameters[leaf]
            module.add_module(leaf, q)
            done.append(f"{path}.{leaf}")
    return done


def quantized_weights(model: nn.Module) -> dict[str, QuantizedTensor]:
    """Every quantized weight by the parameter name it replaces (`...o_proj.weight`, `...mlp.experts.gate_proj`;
    under a PEFT wrapper `...o_proj.base_layer.weight`)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedTensor):
            owner, _, leaf = name.rpartition(".")
            out[f"{owner}.weight" if leaf == "weight_q" else name] = module
    return out


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the quantized weights take, bytes the same weights take in bf16)."""
    weights = quantized_weights(model).values()
    return sum(q.nbytes() for q in weights), sum(2 * q.numel() for q in weights)


def describe_quantized(model: nn.Module) -> str:
    """E.g. `30 frozen weights in 126.5 KiB (373.5 KiB in bf16, 0.34×)`, for the console."""
    stored, bf16 = quantized_bytes(model)
    return (
        f"{len(quantized_weights(model))} frozen weights in {human_bytes(stored)} ({human_bytes(bf16)} in bf16, "
        f"{stored / max(bf16, 1):.2f}×)"
    )


def human_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
