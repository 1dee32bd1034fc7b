"""`python -m deepseek_vl2_lora.export` (`vl2-export`): a step checkpoint as a trained dir (a stock PEFT adapter).

    vl2-export <run dir>/checkpoints/step_XXXXXXXX OUT     # that step's trained state -> OUT
    vl2-export <run dir> OUT                               # its newest intact checkpoint

OUT is what `<run dir>/trained` would be had the run ended at that step: eval, chat, merge and `model.init_from`
take it, and so does `peft.PeftModel.from_pretrained(base model, OUT)`. deepseek_vl2_lora/training/export.py.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="vl2-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("checkpoint", help="a step checkpoint directory, or a run directory (its newest)")
    parser.add_argument("out", help="the trained dir to write")
    args = parser.parse_args(argv)

    from .training import USER_ERRORS
    from .training.export import export_checkpoint

    try:
        print(export_checkpoint(args.checkpoint, args.out))
    except (FileNotFoundError, ValueError, *USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
