"""Small builders shared by the model tests (no I/O: models are built from the tiny family configs)."""

import torch

from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM, VL2Config
from deepseek_vl2_lora.model.tiny import _init_random, family_config

FAMILIES = ("tiny-mha", "small-mla", "full-noaux")


def build_model(family: str, vocab: int = 300, seed: int = 0, **kwargs) -> DeepseekVL2ForCausalLM:
    cfg = VL2Config.from_dict(family_config(family, vocab))
    torch.manual_seed(seed)
    model = DeepseekVL2ForCausalLM(cfg, **kwargs)
    _init_random(model, seed)
    return model


def tokens_per_image(cfg: VL2Config, tw: int, th: int) -> int:
    side = -(-(cfg.vision.image_size // cfg.vision.patch_size) // cfg.projector.downsample_ratio)
    return side * (side + 1) + 1 + (side * th) * (side * tw + 1)


def make_batch(cfg: VL2Config, vocab: int = 300, seed: int = 0, pad: str = "right") -> dict:
    """Sample 0: text, a 2×1 image, text, a 1×2 image, text. Sample 1: text only, 6 tokens shorter (padded)."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size
    n1, n2 = tokens_per_image(cfg, 2, 1), tokens_per_image(cfg, 1, 2)
    t = 3 + n1 + 4 + n2 + 5
    ids = torch.randint(3, vocab, (2, t), generator=g)
    seq_mask = torch.zeros(2, t, dtype=torch.bool)
    seq_mask[0, 3 : 3 + n1] = True
    seq_mask[0, 3 + n1 + 4 : 3 + n1 + 4 + n2] = True
    attn = torch.ones(2, t, dtype=torch.long)
    attn[1, t - 6 :] = 0
    seq_mask[1] = False
    if pad == "left":
        attn[1] = attn[1].flip(0)
        ids[1] = ids[1].roll(6)
    images = torch.zeros(2, 6, 3, s, s)
    images[0] = torch.randn(6, 3, s, s, generator=g)
    crop = torch.tensor([[[2, 1], [1, 2]], [[0, 0], [0, 0]]])
    labels = ids.clone()
    labels[seq_mask | (attn == 0)] = -100
    labels[:, :2] = -100
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "images": images,
        "images_seq_mask": seq_mask,
        "images_spatial_crop": crop,
        "labels": labels,
    }


def write_processor_files(out, image_size: int, patch_size: int):
    """A tokenizer and processor_config.json in `out` (the processor files of a checkpoint), returned."""
    from deepseek_vl2_lora.model.processor_config import write_processor_config
    from deepseek_vl2_lora.model.tokenizer import write_tokenizer

    write_tokenizer(out)
    write_processor_config(out, image_size=image_size, patch_size=patch_size)
    return out


def perturb_trainable(model: torch.nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Move every trainable tensor off its start (a LoRA B of zeros included), deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def session_tiny_cache(tmp_path_factory, monkeypatch):
    """The test session's one tiny-checkpoint cache (generated once), W&B off: for an autouse fixture."""
    root = tmp_path_factory.getbasetemp() / "tiny_cache"
    monkeypatch.setenv("DEEPSEEK_VL2_LORA_CACHE", str(root))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return root
