"""Evaluation: teacher-forced loss and exact-match accuracy on the eval split (`evaluate`), and benchmarks in
VLMEvalKit's file format (`benchmarks`). The training loop and the eval CLI use it; it imports `model` and `data`."""

from .. import lazy_exports

_EXPORTS = {"EvalResult": "eval_set", "evaluate": "eval_set"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
