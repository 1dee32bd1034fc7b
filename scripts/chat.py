#!/usr/bin/env python
"""Ask a DeepSeek-VL2 checkpoint (optionally with trained state on top) about images; tokens stream as they come.

    python scripts/chat.py CHECKPOINT_DIR --image a.png --prompt "<image>\\nWhat colour is the shape?"
    python scripts/chat.py RUN_DIR --image a.png --prompt "<image>\\nColour?"   # or RUN_DIR/trained, or a merged dir
    python scripts/chat.py CHECKPOINT_DIR --trained outputs/run/trained --image a.png --image b.png \\
        --prompt "<image><image>\\nCompare them." --sample --temperature 0.7 --top-p 0.9
    python scripts/chat.py CHECKPOINT_DIR --image a.png --prompt "<image>\\nColour?" --prompt "<image>\\nShape?"

Several `--prompt`s are answered as one left-padded batch (each prompt uses all `--image`s in order).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main() -> None:
    from deepseek_vl2_lora.data import load_image
    from deepseek_vl2_lora.generation import generate
    from deepseek_vl2_lora.model import DeepseekVL2ForCausalLM
    from deepseek_vl2_lora.policy import load_trained_state, resolve_trained_model
    from deepseek_vl2_lora.processor import Collator, DeepseekVL2Processor

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "checkpoint",
        help="a checkpoint dir (base or merged), or a run dir / trained-state dir (its base is the adapter's "
        "base_model_name_or_path)",
    )
    ap.add_argument("--trained", help="a trained-state directory (PEFT adapter + policy.json) or its run dir")
    ap.add_argument("--image", action="append", default=[], help="image path; repeat for several")
    ap.add_argument("--prompt", action="append", required=True, help="user turn with <image> placeholders")
    ap.add_argument("--system", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    try:
        checkpoint, trained = resolve_trained_model(args.checkpoint)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    if args.trained:
        if trained is not None:
            sys.exit(f"error: {args.checkpoint} already is a trained model; --trained goes with a base checkpoint")
        trained = args.trained
    processor = DeepseekVL2Processor.from_pretrained(checkpoint)
    model = DeepseekVL2ForCausalLM.from_pretrained(checkpoint, torch_dtype=dtype, attn_implementation=args.attn)
    if trained is not None:
        load_trained_state(model, trained)
    model.to(args.device).eval()

    images = [load_image(Path(p)) for p in args.image]
    encodings = []
    for prompt in args.prompt:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        encodings.append(processor.encode(messages, images, generation=True))
    batch = Collator(processor.pad_id, padding_side="left")(encodings)
    batch = {k: v.to(args.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    single = len(encodings) == 1
    stream = None
    if single:  # special tokens (the final eos) are not printed
        stream = lambda tok: print(
            processor.tokenizer.decode(tok.tolist(), skip_special_tokens=True), end="", flush=True
        )
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    tokens = generate(
        model,
        batch["input_ids"],
        batch["attention_mask"],
        batch["images"],
        batch["images_seq_mask"],
        batch["images_spatial_crop"],
        max_new_tokens=args.max_new_tokens,
        eos_token_id=processor.eos_id,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        use_cache=not args.no_cache,
        generator=gen,
        stream=stream,
    )
    if single:
        print()
        return
    for prompt, row in zip(args.prompt, tokens.tolist()):
        if processor.eos_id in row:
            row = row[: row.index(processor.eos_id)]
        print(f"{prompt!r} -> {processor.tokenizer.decode(row)!r}")


if __name__ == "__main__":
    sys.exit(main())
