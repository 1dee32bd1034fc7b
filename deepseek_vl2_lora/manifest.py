"""`python -m deepseek_vl2_lora.manifest`: write (or `--verify`) a checkpoint directory's manifest.json.

    python -m deepseek_vl2_lora.manifest <run dir>/checkpoints/step_XXXXXXXX      # writes its manifest.json
    python -m deepseek_vl2_lora.manifest --verify <checkpoint dir>                # exit 1 if damaged

What a manifest is and when a checkpoint is intact: deepseek_vl2_lora/training/manifest.py.
"""

from __future__ import annotations

from pathlib import Path

from .training.manifest import MANIFEST_FILE, verify_manifest, write_manifest


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Write (or --verify) a checkpoint directory's manifest.json.")
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--verify", action="store_true", help="only check it; exit status 1 if damaged")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_dir():
        parser.error(f"{args.checkpoint} is not a directory")
    if args.verify:
        problems = verify_manifest(args.checkpoint)
        print("\n".join(problems) if problems else f"{args.checkpoint}: intact")
        return 1 if problems else 0
    if (args.checkpoint / MANIFEST_FILE).exists():
        parser.error(f"{args.checkpoint / MANIFEST_FILE} exists already (--verify checks it)")
    print(write_manifest(args.checkpoint))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
