"""Benchmark start-up data validation (issue #13, item 6): 20,000 records with 1024×768 JPEGs, validated as a
training run does (`SFTDataset` with the tiny checkpoint's processor, `data.max_length=4096`), with an empty
validation cache (first start), then again (second start: a restart, a resume or another rank), then after one
image changed, then with another ``data.max_length`` (a new source entry; image headers from the cache). Each
start runs in a fresh process; the time is the dataset's construction (reading the JSONL included; Python imports
and the tokenizer load excluded, printed apart). Also times the old check (a full decode of each image) on a
sample, for comparison.

    python scripts/bench_data_validation.py [--records 20000] [--dir /tmp/bench_data]

Needs ~0.6 GB in --dir (deleted at the end unless --keep). Results: docs/benchmarks.md, "Data validation".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_data(root: Path, n: int, distinct: int = 16) -> Path:
    """n records, each naming its own 1024×768 JPEG (`distinct` different pictures, copied byte for byte)."""
    from PIL import Image, ImageDraw

    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    blobs = []
    for k in range(distinct):
        im = Image.new("RGB", (1024, 768), (20 * k % 255, 90, 160))
        draw = ImageDraw.Draw(im)
        for j in range(12):
            x, y = (97 * (j + k)) % 900, (61 * (j * k + 1)) % 650
            draw.ellipse((x, y, x + 120, y + 110), fill=((40 * j) % 255, (70 * k) % 255, (25 * j * k) % 255))
        tmp = root / "tmp.jpg"
        im.save(tmp, format="JPEG", quality=90)
        blobs.append(tmp.read_bytes())
    tmp.unlink()
    lines = []
    for i in range(n):
        name = f"{i // 1000:03d}/{i:06d}.jpg"
        (images / name).parent.mkdir(exist_ok=True)
        (images / name).write_bytes(blobs[i % distinct])
        question = f"<image>\nDescribe picture {i}: what shapes and colours are there, and where?"
        answer = f"There are {i % 12 + 1} ellipses in several colours on a blue background, mostly on the left."
        lines.append(json.dumps({"messages": [{"role": "user", "content": question},
                                              {"role": "assistant", "content": answer}],
                                 "images": [f"images/{name}"]}))  # fmt: skip
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    old = time.time() - 60  # files written in the last second are not cached (validation_cache.RACY_NS)
    for p in [path, *images.rglob("*.jpg")]:
        os.utime(p, (old, old))
    return path


def one_start(data: Path, cache: Path, max_length: int) -> dict:
    """Run in a fresh process: construct the training set as preflight does; the timings."""
    import logging

    from deepseek_vl2_lora.data import SFTDataset
    from deepseek_vl2_lora.data.processor import DeepseekVL2Processor
    from deepseek_vl2_lora.model.tiny import ensure_tiny_checkpoint

    logging.basicConfig(level=logging.INFO, format="  %(message)s")
    t0 = time.perf_counter()
    processor = DeepseekVL2Processor.from_pretrained(ensure_tiny_checkpoint("full-noaux"))
    t1 = time.perf_counter()
    ds = SFTDataset(data, processor, max_length=max_length, cache_dir=cache)
    t2 = time.perf_counter()
    return {"processor_load_s": round(t1 - t0, 2), "validation_s": round(t2 - t1, 2), "kept": len(ds),
            "skipped": ds.report.num_skipped}  # fmt: skip


def old_check(data: Path, sample: int) -> float:
    """ms per record of the former check: a full decode of each image (load_image)."""
    from deepseek_vl2_lora.data import load_image

    paths = sorted((data.parent / "images").rglob("*.jpg"))[:sample]
    t0 = time.perf_counter()
    for p in paths:
        _ = load_image(p).size
    return (time.perf_counter() - t0) / len(paths) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--dir", default="/tmp/bench_data_validation")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--one-start", nargs=3, metavar=("DATA", "CACHE", "MAX_LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one_start:
        data, cache, max_length = args.one_start
        print(json.dumps(one_start(Path(data), Path(cache), int(max_length))))
        return
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        data = make_data(root / "data", args.records)
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        print(f"generated {args.records} records, {size / 2**30:.2f} GiB, in {time.perf_counter() - t0:.0f} s")
        cache = root / "cache"

        def start(label: str, max_length: int = 4096) -> dict:
            cmd = [sys.executable, __file__, "--one-start", str(data), str(cache), str(max_length)]
            out = subprocess.run(
                cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{label}: {json.dumps(result)}")
            return result

        first = start("first start (empty cache)")
        second = start("second start (cache hit)")
        changed = sorted((data.parent / "images").rglob("*.jpg"))[123]
        os.utime(changed, (time.time() - 30, time.time() - 30))
        third = start("after one image changed")
        start("another data.max_length (image headers cached, records tokenized)", max_length=2048)
        ms = old_check(data, 500)
        print(f"former check (full decode, 500 images): {ms:.2f} ms/record -> {ms * args.records / 1e3:.0f} s for "
              f"{args.records} records")  # fmt: skip
        ok = first["validation_s"] <= 30 and second["validation_s"] <= 2
        print(f"targets (first ≤ 30 s, second ≤ 2 s): {'met' if ok else 'NOT met'}; third {third['validation_s']} s")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
