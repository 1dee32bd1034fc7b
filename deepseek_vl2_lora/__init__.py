"""Fine-tuning DeepSeek-VL2: a faithful model, freezing policies, LoRA and a plain training loop."""

__version__ = "0.1.0"
