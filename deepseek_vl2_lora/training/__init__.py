"""Training: the loop and its step, the run's setup and teardown, the engines (one process; DeepSpeed ZeRO-2/3),
resumable checkpoints and their manifests, preemption, the run lock, metrics, the typed config, preflight checks and
the vision feature cache.

Imports `model`, `policy`, `data` and `evaluation`."""

from .. import lazy_exports

_EXPORTS = {
    "TrainResult": "loop",
    "USER_ERRORS": "loop",
    "train": "loop",
    "TrainConfig": "config",
    "ConfigError": "config",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
