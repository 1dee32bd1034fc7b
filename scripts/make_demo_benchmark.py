"""Generate the synthetic demo benchmarks (data/demo/bench_*.tsv) in VLMEvalKit's TSV format, from the demo eval
split: deterministic, byte-identical on every run.

    bench_mcq.tsv   64 multiple-choice questions: the demo question, its type's candidate answers as options A-D
                    (2 to 4, in a seeded order), the answer letter, a hint on some rows, category = question type,
                    l2-category = attribute / spatial / counting, the 64x64 PNG as base64
    bench_vqa.tsv   the same 64 questions as open VQA with 10 references each (VQA-style list literal), some written
                    as annotators write them ("a blue", "two", "Left.") so the VQA normalisation matters

The images are the committed data/demo/images/eval_*.png bytes (no drawing here), so the files depend only on them.
The demo model is trained on data/demo/train.jsonl, whose images never repeat here.

    python scripts/make_demo_benchmark.py            # (re)write data/demo/bench_mcq.tsv and bench_vqa.tsv
    python scripts/make_demo_benchmark.py --check    # regenerate in a temp dir and compare byte for byte
"""

from __future__ import annotations

import base64
import csv
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_data import ANSWERS, DEFAULT_OUT, generator_main  # noqa: E402

SEED = 2024
FILES = ("bench_mcq.tsv", "bench_vqa.tsv")
L2 = {"colour": "attribute", "shape": "attribute", "side": "spatial", "height": "spatial", "count": "counting"}
HINTS = {
    "count": "Shapes in different places count separately.",
    "side": "The picture is split into a left and a right half.",
}
NUMBER_WORDS = {"1": "one", "2": "two", "3": "three"}


def _records(demo_dir: Path) -> list[dict]:
    lines = (demo_dir / "eval.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _references(answer: str, rng: random.Random) -> list[str]:
    """Ten references, most the answer itself, some in forms that only normalisation makes equal."""
    variants = [f"a {answer}" if not answer.isdigit() else NUMBER_WORDS[answer], answer.capitalize() + "."]
    return [answer] * 7 + [rng.choice(variants) for _ in range(3)]


def _write(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")  # pandas' to_csv(sep="\t") quoting
        writer.writerow(header)
        writer.writerows(rows)


def generate(out_dir: str | Path, demo_dir: str | Path = DEFAULT_OUT) -> list[Path]:
    out, demo = Path(out_dir), Path(demo_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    mcq, vqa = [], []
    for index, record in enumerate(_records(demo)):
        qtype, answer = record["qtype"], record["messages"][-1]["content"]
        question = record["messages"][0]["content"].replace("<image>", "").strip()
        image = base64.b64encode((demo / record["images"][0]).read_bytes()).decode("ascii")
        options = list(ANSWERS[qtype])
        rng.shuffle(options)
        cells = options + [""] * (4 - len(options))  # empty cells: no option E for a 2-option question
        letter = "ABCD"[options.index(answer)]
        hint = HINTS.get(qtype, "") if index % 2 else ""
        mcq.append([index, question, hint, *cells, letter, qtype, L2[qtype], "dev", image])
        vqa.append([index, question, repr(_references(answer, rng)), qtype, "val", image])
    paths = [out / name for name in FILES]
    mcq_header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "split"]
    _write(paths[0], [*mcq_header, "image"], mcq)
    _write(paths[1], ["index", "question", "answer", "category", "split", "image"], vqa)
    return paths


def main(argv: list[str] | None = None) -> int:
    return generator_main(__doc__, generate, (".tsv",), argv)


if __name__ == "__main__":
    sys.exit(main())
