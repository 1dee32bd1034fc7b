#!/usr/bin/env python
"""Data-loading memory benchmark: a large Parquet file with embedded images, read through the training data path.

    python scripts/bench_data_memory.py                       # 200,000 rows, 1,000 batches of 4 (issue #14)
    python scripts/bench_data_memory.py --rows 2000 --batches 50   # a quick smoke run

Writes a the_cauldron-style Parquet file (`images: list<{bytes, path}>` with one random-noise PNG per row, `texts:
[{user, assistant}]`) to a temporary directory, builds the training set from it exactly as a run does
(`SFTDataset`: `datasets` converts the file once into a memory-mapped Arrow cache, every row is validated, the set
keeps only row numbers), then reads batches through the trainer's own loader (`batch_stream` over `SkipBadSamples`
with the training `Collator`). Prints the process's resident memory (VmRSS, split into anonymous memory and
file-backed pages of the memory map) before, after building the set, after the first batch and after the last,
and the growth between the first and the last batch. The goal (#14): less than 200 MB of growth over the first
1,000 batches, whatever the data set's size.
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

MB = 2**20


def rss() -> tuple[int, int, int]:
    """(VmRSS, RssAnon, RssFile) in bytes: resident memory, its anonymous part (the process's own allocations) and
    its file-backed part (here: pages of the memory-mapped Arrow file, which the kernel can drop at any time)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["RssAnon"], fields["RssFile"]


def show(label: str, now: tuple[int, int, int]) -> None:
    total, anon, file = (x / MB for x in now)
    print(f"{label:<28s} VmRSS {total:7.0f} MB  (RssAnon {anon:7.0f} MB, RssFile {file:7.0f} MB)")


def noise_png(rng: random.Random, size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3)).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path: Path, rows: int, image_size: int, seed: int = 0) -> None:
    """`rows` records in row groups of 10,000, written one group at a time (the writer's memory stays small)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema(
        [
            ("images", pa.list_(image)),
            ("texts", pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string())]))),
        ]
    )
    with pq.ParquetWriter(str(path), schema) as writer:
        for start in range(0, rows, 10_000):
            n = min(10_000, rows - start)
            images = [[{"bytes": noise_png(rng, image_size), "path": None}] for _ in range(n)]
            texts = [[{"user": f"What is in picture {start + i}?", "assistant": f"noise {i % 97}"}] for i in range(n)]
            writer.write_table(pa.table({"images": images, "texts": texts}, schema=schema))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batches", type=int, default=1_000)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32, help="side of the square noise PNGs (pixels)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (data.num_workers)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_memory_"))
    os.environ["HF_DATASETS_CACHE"] = str(tmp / "hf_cache")  # before `datasets` is imported
    try:
        import torch

        from deepseek_vl2_lora.data import CollateItems, SFTDataset, SkipBadSamples, unwrap_batch
        from deepseek_vl2_lora.data.collate import Collator
        from deepseek_vl2_lora.data.processor import DeepseekVL2Processor
        from deepseek_vl2_lora.data.sampling import batch_stream
        from deepseek_vl2_lora.model.tiny import ensure_tiny_checkpoint

        torch.set_num_threads(1)
        parquet = tmp / "train.parquet"
        t0 = time.perf_counter()
        write_parquet(parquet, args.rows, args.image_size)
        print(f"wrote {parquet.stat().st_size / MB:.0f} MB ({args.rows} rows) in {time.perf_counter() - t0:.0f} s")
        processor = DeepseekVL2Processor.from_pretrained(ensure_tiny_checkpoint("tiny-mha"))

        before = rss()
        t0 = time.perf_counter()
        dataset = SFTDataset(parquet, processor, max_length=4096)
        built = rss()
        print(f"built the training set ({len(dataset)} samples) in {time.perf_counter() - t0:.0f} s")
        stream = batch_stream(
            SkipBadSamples(dataset),
            CollateItems(Collator(processor.pad_id)),
            args.batch_size,
            seed=0,
            epoch=0,
            start=0,
            num_workers=args.workers,
        )
        t0 = time.perf_counter()
        samples = 0
        for i in range(args.batches):
            batch = unwrap_batch(next(stream)[2])
            samples += batch["input_ids"].shape[0]
            if i == 0:
                first = rss()
        last = rss()
        seconds = time.perf_counter() - t0
        print(f"read {args.batches} batches ({samples} samples) in {seconds:.0f} s")
        show("before the set", before)
        show("after building it", built)
        show("after batch 1", first)
        show(f"after batch {args.batches}", last)
        growth = (last[0] - first[0]) / MB
        verdict = "within" if growth < 200 else "OVER"
        print(f"VmRSS growth over the batches: {growth:.0f} MB ({verdict} the 200 MB goal)")
        anon = (built[1] - before[1]) / MB
        print(f"RssAnon growth from building the set: {anon:.0f} MB (mostly the one-time Parquet → Arrow conversion)")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
