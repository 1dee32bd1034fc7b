"""GPU memory for model states under DeepSpeed ZeRO, by DeepSpeed's own accounting.

bf16 training under DeepSpeed keeps the whole module in bf16 (trainable weights too) and gives the optimizer
fp32 master copies of the trainable ones. Per trainable parameter DeepSpeed counts a bf16 weight (2 bytes; sharded
under ZeRO-3) and 18 bytes sharded over the N ranks (ZeRO-2: bf16 gradient 2, fp32 gradient 4, fp32 master 4,
Adam moments 8; ZeRO-3: the bf16 weight shard instead of the bf16 gradient), and under ZeRO-3 4 bytes per
parameter of the largest layer (gathered weights and gradients): `estimate_zero2_model_states_mem_needs` and
`estimate_zero3_model_states_mem_needs`, which tests check these rules against. Frozen parameters reach no
optimizer: 2 bytes each, replicated under ZeRO-2, sharded under ZeRO-3.

- ZeRO-2: weights whole on every rank; gradients and optimizer state sharded. Buffers: the gradient reduction
  bucket (`reduce_bucket_size` bf16 elements; two with `overlap_comm`).
- ZeRO-3: weights sharded too. Working set: the largest unit gathered at once (a module's own parameters; an MoE
  block is one leaf, all experts together) with its bf16 gradients when it trains, plus the prefetch bucket
  (`stage3_prefetch_bucket_size`), capped by `stage3_max_live_parameters`; parameters below
  `stage3_param_persistence_threshold` elements stay whole on every rank. Buffers: one reduction bucket.
- `offload_optimizer`: the fp32 gradient, master and moments live in CPU memory (ZeRO-Offload).
- Quantized frozen weights (`model.quantize`) are module buffers, which DeepSpeed does not partition: replicated
  under ZeRO-2; ZeRO-3 with them is a config error (training/config.py), and the plan has no ZeRO-3 column then.
Activations do not change with the stage: every rank runs its own micro batch, as one process does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# DeepSpeed's defaults (deepspeed/runtime/zero/config.py) for keys a config may leave out.
ZERO_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "overlap_comm": False,
    "contiguous_gradients": True,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "stage3_max_live_parameters": 1_000_000_000,
}


@dataclass
class ParamCounts:
    frozen: int
    trainable: int
    largest_unit: int  # parameters ZeRO-3 gathers at once for the largest module (an MoE block is one leaf)
    largest_unit_trainable: int
    persistent_frozen: int  # in tensors below the persistence threshold: whole on every rank under ZeRO-3
    persistent_trainable: int
    quantized_bytes: int = 0  # frozen weights stored quantized (model.quantize): buffers, replicated under ZeRO-2


def param_counts(model: torch.nn.Module, persistence_threshold: int) -> ParamCounts:
    from ..model.moe import MoE
    from ..model.quant import quantized_bytes

    frozen = trainable = pf = pt = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel()
            pt += p.numel() if p.numel() < persistence_threshold else 0
        else:
            frozen += p.numel()
            pf += p.numel() if p.numel() < persistence_threshold else 0
    largest = (0, 0)
    leaves = [m for m in model.modules() if isinstance(m, MoE)]
    inside = {id(p) for m in leaves for p in m.parameters()}
    units = [list(m.parameters()) for m in leaves]
    units += [[p for p in m.parameters(recurse=False) if id(p) not in inside] for m in model.modules()]
    for params in units:
        size = (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))
        largest = max(largest, size)
    return ParamCounts(frozen, trainable, largest[0], largest[1], pf, pt, quantized_bytes(model)[0])


def zero_settings(ds_config: dict) -> dict:
    zero = ds_config.get("zero_optimization", {})
    return {k: zero.get(k, v) for k, v in ZERO_DEFAULTS.items()}


def zero_model_states(counts: ParamCounts, stage: int, ranks: int, ds_config: dict, offload_optimizer: bool) -> dict:
    """Bytes per rank: weights, trainable (bf16 model copies), gradients, optimizer, buffers (ZeRO's buckets and
    ZeRO-3's gathered working set)."""
    s = zero_settings(ds_config)
    n, t, f = ranks, counts.trainable, counts.frozen
    # Sharded fp32 state per trainable parameter: gradient 4, master 4, Adam moments 8 (on the CPU when offloaded);
    # ZeRO-2 also shards the bf16 gradient (2).
    grad_bytes = 0 if offload_optimizer else 4 + (2 if stage == 2 else 0)
    out = {"gradients": grad_bytes * t // n, "optimizer": 0 if offload_optimizer else 12 * t // n}
    if stage == 2:
        out["weights"], out["trainable"] = 2 * f + counts.quantized_bytes, 2 * t
        n_buckets = 2 if s["overlap_comm"] else 1
        out["buffers"] = n_buckets * 2 * s["reduce_bucket_size"] if t and s["contiguous_gradients"] else 0
        return out
    if counts.quantized_bytes:
        raise ValueError("ZeRO-3 does not shard quantized weights (model.quantize): plan ZeRO-2 instead")
    out["weights"] = 2 * ((f - counts.persistent_frozen) // n + counts.persistent_frozen)
    out["trainable"] = 2 * ((t - counts.persistent_trainable) // n + counts.persistent_trainable)
    gathered = min(counts.largest_unit + s["stage3_prefetch_bucket_size"], s["stage3_max_live_parameters"])
    working = 2 * gathered + 2 * counts.largest_unit_trainable  # bf16 weights (+ their bf16 grads) gathered
    out["buffers"] = working + (2 * s["reduce_bucket_size"] if t and s["contiguous_gradients"] else 0)
    return out
