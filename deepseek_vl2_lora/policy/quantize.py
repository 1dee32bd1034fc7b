"""Which weights `model.quantize` stores quantized under a policy (model/quant.py does the storing).

Always quantized: the dense MLP, the shared and the routed experts (and `lm_head` with `model.quantize_lm_head`);
training any of them in full is a config error. Attention projections (MLA low-rank paths, q_proj, MHA q/k/v, o_proj)
are quantized unless the policy trains them in full: those stay in the storage dtype as trainable parameters. A LoRA
group's base weight is quantized (LoRA wraps a frozen base), except the stacked routed experts: PEFT targets them as
parameters, which a quantized tensor is not, so under `routed_experts: lora` they stay in the storage dtype.
Embeddings, norms, router gates, the vision tower and the projector are never quantized.
"""

from __future__ import annotations

from .config import PolicyConfig
from .groups import group_of, layer_of, to_policy_config

ATTENTION_GROUPS = ("q_low_rank", "kv_low_rank", "q_proj", "mha_qkv", "o_proj")
ALWAYS_QUANTIZED = ("mlp_dense", "shared_experts", "routed_experts")


def keep_unquantized(policy, use_mla: bool):
    """`keep(parameter name) -> bool` for `from_pretrained(keep_unquantized=...)`: the weights this policy trains in
    full among the attention projections, and LoRA-targeted routed experts (see the module docstring)."""
    cfg = to_policy_config(policy)

    def keep(name: str) -> bool:
        g = group_of(name, use_mla)
        spec = getattr(cfg.groups, g)
        if spec.layers is not None and layer_of(name) not in spec.layers:
            return False
        return (g in ATTENTION_GROUPS and spec.mode == "train") or (g == "routed_experts" and spec.mode == "lora")

    return keep


def quantize_conflicts(policy: PolicyConfig, quantize: str, quantize_lm_head: bool) -> list[str]:
    """One line per group the policy trains in full although `quantize` always stores it quantized."""
    if quantize == "none":
        return []
    cfg = to_policy_config(policy)
    groups = ALWAYS_QUANTIZED + (("lm_head",) if quantize_lm_head else ())
    trained = [g for g in groups if getattr(cfg.groups, g).mode == "train"]
    if not trained:
        return []
    return [
        f"model.quantize={quantize} stores {', '.join(trained)} quantized, but policy {cfg.name} trains "
        f"{'it' if len(trained) == 1 else 'them'} in full: freeze or LoRA (policy.groups.<group>.mode=lora) instead, "
        "or set model.quantize=none" + (" or model.quantize_lm_head=false" if "lm_head" in trained else "")
    ]
