"""Independent reference for DeepSeek-VL2 ("official" semantics), used as a yardstick in tests.

Derived only from /work/shared/reference/deepseek_vl2.md (and a read of the official sources it cites).
Nothing here imports ``deepseek_vl2_lora``: the point is to check that package against an implementation
written separately, in plain functional PyTorch, directly from a state dict on disk.

- ``checkpoint``: scaled-down checkpoints in the official on-disk layout (sparse config.json, official keys).
- ``forward``: the official eval forward (SigLIP ViT, projector, tile layout, DeepSeek-V2 LM with MLA/MHA/MoE).
- ``batch``: a batch in the official processor's layout, without a tokenizer.
"""
