"""The DeepSeek-VL2 model (SigLIP tower, projector, DeepSeek-V2 MoE language model with MLA or MHA attention), its
parts, loading and saving in the official checkpoint layout, decoding, and random tiny checkpoints for tests.

Imports nothing from the rest of the package, nor Hydra."""

from .. import lazy_exports

_EXPORTS = {
    "DeepseekVL2ForCausalLM": "deepseek_vl2",
    "IGNORE_INDEX": "deepseek_vl2",
    "VL2Config": "config",
    "generate": "generation",
    "FAMILIES": "tiny",
    "ensure_tiny_checkpoint": "tiny",
    "make_tiny_checkpoint": "tiny",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
