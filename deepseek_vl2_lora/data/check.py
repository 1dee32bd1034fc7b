"""``python -m deepseek_vl2_lora.data check FILE...``: validate data sets as training would, without a model.

Only the processor and tokenizer are loaded (``--model DIR``: a checkpoint directory's processor_config.json and
tokenizer files; default: the repository's generated tiny checkpoint, whose tokenizer is not the released one, so
token lengths are approximate without ``--model``). Every record is checked in skip mode, so every bad line is
found in one pass; each one is written to the report (``--report``, default ``data_check.jsonl`` in the working
directory) as ``{"file", "location", "reason", "message"}``, and a summary per file and reason is printed. Exit
status: 0 when every line is good, 1 when some are bad, 2 for a usage error (one line, no traceback).

The validation cache (``--cache-dir``, default the training default) is shared with training: image headers read
here are not read again by a run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from pathlib import Path

from ..model.processor_config import ProcessorConfigError
from .datasets import EvalDataset, SFTDataset
from .images import DEFAULT_MAX_IMAGE_PIXELS, LARGE_IMAGE
from .processor import DeepseekVL2Processor, SampleError, one_line

DEFAULT_REPORT = "data_check.jsonl"
TINY_FAMILY = "full-noaux"  # model=tiny_random's


def _int_or_none(text: str) -> int | None:
    if text.lower() in ("none", "null"):
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be ≥ 1 (or none)")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deepseek_vl2_lora.data", description="Data set tools.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="validate data files and list every bad line", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    c.add_argument("files", nargs="+", metavar="FILE", help=".jsonl, .json, .parquet or a dataset directory")
    c.add_argument("--report", default=DEFAULT_REPORT, help=f"the JSONL list of bad lines (default {DEFAULT_REPORT})")
    c.add_argument("--model", help="checkpoint directory whose processor and tokenizer to use (default: tiny)")
    c.add_argument("--eval", action="store_true", help="check as eval data (the last turn is the reference)")
    c.add_argument("--split", help="the split of a dataset directory with several")
    c.add_argument("--image-root", help="where relative image paths start (default: each file's directory)")
    c.add_argument("--columns", action="append", default=[], metavar="OURS=THEIRS", help="rename a key (repeat)")
    c.add_argument("--max-length", type=_int_or_none, default=4096, help="token limit, or none (default 4096)")
    c.add_argument("--overlong", choices=("error", "skip", "truncate"), default="error",
                   help="truncate: over-long samples that can be cut are good (default: bad lines)")  # fmt: skip
    c.add_argument("--exif-transpose", action="store_true", help="rotate images by their EXIF orientation")
    c.add_argument("--max-image-pixels", type=_int_or_none, default=DEFAULT_MAX_IMAGE_PIXELS,
                   help=f"pixel limit, or none (default {DEFAULT_MAX_IMAGE_PIXELS:,})")  # fmt: skip
    c.add_argument("--large-image", choices=LARGE_IMAGE, default="reject", help="above the limit (default reject)")
    c.add_argument("--cache-dir", default=None, help="validation cache directory, or none (default: training's)")
    return p


def _columns(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        ours, sep, theirs = pair.partition("=")
        if not (sep and ours and theirs):
            raise ValueError(f"--columns {pair!r}: expected OURS=THEIRS, e.g. messages=conv")
        out[ours] = theirs
    return out


def load_processor(model: str | None) -> DeepseekVL2Processor:
    if model is None:
        from ..model.tiny import ensure_tiny_checkpoint

        return DeepseekVL2Processor.from_pretrained(ensure_tiny_checkpoint(TINY_FAMILY))
    return DeepseekVL2Processor.from_pretrained(Path(model).expanduser())


def check(args: argparse.Namespace, out=None) -> int:
    """Validate args.files; write the report; print the summary; 0 if every line is good, else 1."""
    out = out or sys.stdout
    columns = _columns(args.columns)
    processor = load_processor(args.model)
    options = dict(
        on_bad_sample="skip",
        max_length=args.max_length,
        image_root=args.image_root,
        columns=columns,
        exif_transpose=args.exif_transpose,
        split=args.split,
        max_image_pixels=args.max_image_pixels,
        large_image=args.large_image,
        cache_dir=args.cache_dir,
    )
    bad: list[dict] = []
    for name in args.files:
        try:
            if args.eval:
                ds = EvalDataset(name, processor, **options)
            else:
                overlong = "truncate" if args.overlong == "truncate" else "skip"
                ds = SFTDataset(name, processor, overlong=overlong, **options)
        except SampleError as e:  # the file itself: unreadable, not a data file, no such split
            bad.append({"file": name, "location": e.location or name, "reason": e.reason, "message": e.message})
            print(f"{name}: unreadable: {e.message} [{e.reason}]", file=out)
            continue
        report = ds.report
        lines = [{"file": name, **line} for line in report.skipped_lines]
        bad += lines
        status = f"{len(lines)} bad" if lines else "all good"
        print(f"{name}: {report.total} records, {report.kept} good, {status} (layout {report.layout or 'none'})",
              file=out)  # fmt: skip
        for reason, count in sorted(Counter(x["reason"] for x in lines).items()):
            first = next(x for x in lines if x["reason"] == reason)
            print(f"  {reason}: {count}  (first: {first['location']}: {first['message']})", file=out)
    path = Path(args.report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in bad), encoding="utf-8")
    print(f"{len(bad)} bad line(s) in {len(args.files)} file(s); report: {path}", file=out)
    if args.model is None and args.max_length is not None:
        print("(token lengths counted with the tiny tokenizer: pass --model CHECKPOINT_DIR for the real one)", file=out)
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return check(args)
    except (ValueError, OSError, ProcessorConfigError) as e:  # user mistakes: one line (SampleErrors are lines)
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
