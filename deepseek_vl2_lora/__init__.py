"""Fine-tuning DeepSeek-VL2: a faithful model, freezing policies, LoRA and a plain training loop."""

from ._compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"
