"""The freezing policy: which parameter groups train (in full or by LoRA) and which stay frozen, the policy report,
the trained state (`trained/`: the trained tensors and a stock-PEFT adapter) and merging it into the base weights.

Imports `model` only."""

from .. import lazy_exports

_EXPORTS = {
    "GROUP_NAMES": "config",
    "PolicyConfig": "config",
    "PolicyError": "groups",
    "PolicyReport": "report",
    "apply_policy": "groups",
    "optimizer_param_groups": "groups",
    "load_trainable_state_dict": "groups",
    "save_trained_state": "adapters",
    "read_trained_state": "adapters",
    "load_trained_state": "adapters",
    "load_trained_tensors": "adapters",
    "policy_from_adapter": "foreign",
    "resolve_trained_model": "adapters",
    "merge_lora": "lora",
    "merge_checkpoint": "merge",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
