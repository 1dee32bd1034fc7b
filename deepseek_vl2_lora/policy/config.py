"""The freezing policy's typed config (the Hydra `policy` node): one entry per named parameter group.

Every group has a field, so `policy.groups.o_proj.mode=lora` works from the command line and a misspelled
group or option fails when Hydra composes the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

MODES = ("freeze", "train", "lora")


@dataclass
class GroupPolicy:
    mode: str = "freeze"  # freeze | train (all weights) | lora (additive PEFT LoRA on the group's Linear layers)
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    init: str = "default"  # PEFT init_lora_weights: default (B = 0), gaussian, pissa, olora, ...
    layers: list[int] | None = None  # decoder layer indices to touch (LM groups only); None = all
    lr_scale: float = 1.0  # this group's learning rate = optim.lr × lr_scale
    required: bool = True  # false: train where the checkpoint has the group, skip silently-but-reported where not


@dataclass
class PolicyGroups:
    vision: GroupPolicy = field(default_factory=GroupPolicy)
    projector: GroupPolicy = field(default_factory=GroupPolicy)
    view_tokens: GroupPolicy = field(default_factory=GroupPolicy)
    embed_tokens: GroupPolicy = field(default_factory=GroupPolicy)
    lm_head: GroupPolicy = field(default_factory=GroupPolicy)
    norms: GroupPolicy = field(default_factory=GroupPolicy)
    q_low_rank: GroupPolicy = field(default_factory=GroupPolicy)
    kv_low_rank: GroupPolicy = field(default_factory=GroupPolicy)
    q_proj: GroupPolicy = field(default_factory=GroupPolicy)
    mha_qkv: GroupPolicy = field(default_factory=GroupPolicy)
    o_proj: GroupPolicy = field(default_factory=GroupPolicy)
    mlp_dense: GroupPolicy = field(default_factory=GroupPolicy)
    shared_experts: GroupPolicy = field(default_factory=GroupPolicy)
    routed_experts: GroupPolicy = field(default_factory=GroupPolicy)
    router: GroupPolicy = field(default_factory=GroupPolicy)


GROUP_NAMES = tuple(f.name for f in fields(PolicyGroups))


@dataclass
class PolicyConfig:
    name: str = "custom"
    on_missing: str = "error"  # a group asked to train that matches nothing: error | skip (recorded warning)
    groups: PolicyGroups = field(default_factory=PolicyGroups)
