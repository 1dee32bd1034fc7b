"""Generate the synthetic shape VQA demo set (data/demo): deterministic, byte-identical on every run.

Each 64x64 PNG shows large flat-coloured shapes on a light grey background; each record asks one question:

    colour    "What colour is the shape?"               red | green | blue | yellow
    shape     "What shape is shown?"                    circle | square | triangle
    count     "How many shapes are there?"              1 | 2 | 3
    side      "Is the shape on the left or the right?"  left | right
    height    "Is the shape at the top or the bottom?"  top | bottom

Colour and position dominate the picture (one big shape, or a shape filling most of one half), so a model with
a frozen random-init vision tower can still learn them. Usage:

    python scripts/make_demo_data.py                 # (re)write data/demo
    python scripts/make_demo_data.py --check         # regenerate in a temp dir and compare byte for byte
"""

from __future__ import annotations

import argparse
import filecmp
import io
import json
import random
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
BACKGROUND = (235, 235, 235)
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {
    "colour": "What colour is the shape?",
    "shape": "What shape is shown?",
    "count": "How many shapes are there?",
    "side": "Is the shape on the left or the right?",
    "height": "Is the shape at the top or the bottom?",
}
QTYPES = tuple(QUESTIONS)
SPLITS = {"train": (512, 1234), "eval": (64, 5678)}  # name -> (records, seed)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "data" / "demo"


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _box(cx: int, cy: int, size: int) -> tuple[int, int, int, int]:
    half = size // 2
    return cx - half, cy - half, cx - half + size - 1, cy - half + size - 1


ANSWERS = {
    "colour": tuple(sorted(COLOURS)),
    "shape": SHAPES,
    "count": ("1", "2", "3"),
    "side": ("left", "right"),
    "height": ("top", "bottom"),
}


def make_example(qtype: str, answer: str, rng: random.Random) -> Image.Image:
    """An image whose answer to the `qtype` question is `answer`; everything else is drawn from `rng`."""
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    colour, shape = rng.choice(ANSWERS["colour"]), rng.choice(SHAPES)
    colour = answer if qtype == "colour" else colour
    shape = answer if qtype == "shape" else shape
    if qtype in ("colour", "shape"):
        # One big centred shape: most of the image is its colour.
        size = rng.randint(40, 52)
        cx, cy = SIZE // 2 + rng.randint(-4, 4), SIZE // 2 + rng.randint(-4, 4)
        draw_shape(draw, shape, _box(cx, cy, size), COLOURS[colour])
        return image
    if qtype in ("side", "height"):
        # One shape filling most of one half; the other half stays empty.
        where = answer
        size = rng.randint(24, 30)
        near, far = 16 + rng.randint(-2, 2), SIZE // 2 + rng.randint(-6, 6)
        near = near if where in ("left", "top") else SIZE - near
        cx, cy = (near, far) if qtype == "side" else (far, near)
        draw_shape(draw, shape, _box(cx, cy, size), COLOURS[colour])
        return image
    # count: 1-3 shapes in distinct quadrants, each with its own colour and kind.
    n = int(answer)
    for quadrant in rng.sample(range(4), n):
        cx = 16 + 32 * (quadrant % 2) + rng.randint(-2, 2)
        cy = 16 + 32 * (quadrant // 2) + rng.randint(-2, 2)
        fill = COLOURS[rng.choice(ANSWERS["colour"])]
        draw_shape(draw, rng.choice(SHAPES), _box(cx, cy, rng.randint(18, 24)), fill)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=9)  # no metadata, fixed settings: reproducible bytes
    return buf.getvalue()


def generate(out_dir: str | Path) -> dict[str, Path]:
    """Write images/ and {split}.jsonl for every split; returns the JSONL paths."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    seen: set[bytes] = set()  # eval images never repeat a train image
    paths = {}
    for split, (count, seed) in SPLITS.items():
        rng = random.Random(seed)
        lines = []
        for i in range(count):
            # Question types take turns and each type cycles through its answers: balanced classes.
            qtype = QTYPES[i % len(QTYPES)]
            answers = ANSWERS[qtype]
            answer = answers[(i // len(QTYPES)) % len(answers)]
            data = b""
            while not data or data in seen:
                data = png_bytes(make_example(qtype, answer, rng))
            seen.add(data)
            rel = f"images/{split}_{i:04d}.png"
            (out / rel).write_bytes(data)
            record = {
                "messages": [
                    {"role": "user", "content": f"<image>\n{QUESTIONS[qtype]}"},
                    {"role": "assistant", "content": answer},
                ],
                "images": [rel],
                "qtype": qtype,
            }
            lines.append(json.dumps(record, ensure_ascii=False))
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def differences(a: Path, b: Path, suffixes=(".png", ".jsonl")) -> list[str]:
    """Relative paths that differ between two generated trees (missing on either side included)."""
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.suffix in suffixes}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.suffix in suffixes}
    diff = sorted(str(p) for p in files_a ^ files_b)
    diff += sorted(str(p) for p in files_a & files_b if not filecmp.cmp(a / p, b / p, shallow=False))
    return diff


def generator_main(doc: str, generate, suffixes, argv: list[str] | None = None) -> int:
    """The CLI of a demo-file generator: write into --out, or with --check regenerate in a temporary directory and
    compare the files with `suffixes` byte for byte."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="compare a fresh generation with --out")
    args = parser.parse_args(argv)
    if not args.check:
        paths = generate(args.out)
        print("wrote " + ", ".join(str(p) for p in (paths.values() if isinstance(paths, dict) else paths)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(tmp)
        diff = differences(Path(tmp), args.out, suffixes)
    if diff:
        print(f"{len(diff)} file(s) differ, e.g. {diff[:5]}", file=sys.stderr)
        return 1
    print(f"{args.out} matches a fresh generation")
    return 0


def main(argv: list[str] | None = None) -> int:
    return generator_main(__doc__, generate, (".png", ".jsonl"), argv)


if __name__ == "__main__":
    sys.exit(main())
