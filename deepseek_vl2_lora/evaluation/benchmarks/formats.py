"""Benchmark files in VLMEvalKit's format, and how each one is scored.

A VLMEvalKit TSV (MMBench_DEV_EN.tsv, AI2D_TEST.tsv, TextVQA_VAL.tsv, ...) has a header and one row per question:

    index        the question's id (MMBench files also hold its rotated copies at index + k * 1_000_000)
    question     the question text
    hint         optional context shown before the question
    A ... Z      multiple-choice options; an empty cell is no option
    answer       the option letter (multiple choice), or the reference answer(s) of an open question: one string,
                 or a Python/JSON list literal of strings (`answers` is accepted too, as in the Hub copies)
    image        the picture as base64, or a list literal of base64 strings (several images), or the `index` of
                 another row whose image it shares (VLMEvalKit writes repeated images once);
                 `image_path` instead: a path (or a list literal of paths) relative to the file
    category, l2-category, split   optional; accuracy is also reported per category

The Hub's parquet copies of the same sets (read with `datasets`) have the same columns, the image as an image
feature (bytes) instead of base64.

Task (how answers are scored, `scoring.py`), detected from the columns and the file name unless given:

    mcq       options A, B, ... present: the answer letter is extracted from the reply
    anls      DocVQA / InfoVQA (file name): average normalized Levenshtein similarity, threshold 0.5
    relaxed   ChartQA (file name): numbers within 5 % of the reference, otherwise exact match
    ocrbench  OCRBench (file name): the reference occurs in the reply
    yesno     every reference is yes or no (MME, POPE, ...): the yes/no word extracted from the reply
    vqa       any other open question (TextVQA, VQAv2, ...): VQA accuracy over the references

Circular evaluation (MMBench): each question is asked once per rotation of its options and counts as correct only if
every rotation is. It is on for files named like MMBench and for files that hold rotated copies; a file without the
copies gets them made here (rotations of the options, the answer letter moved along).
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import json
import re
import string
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from PIL import Image

from ... import REPO_ROOT

TASKS = ("mcq", "vqa", "anls", "relaxed", "yesno", "ocrbench")
OPTION_LETTERS = string.ascii_uppercase
CIRCULAR_OFFSET = 1_000_000  # VLMEvalKit stores MMBench's rotated copies at index + k * 1e6
IMAGE_COLUMNS = ("image", "image_path")
ANSWER_COLUMNS = ("answer", "answers")
_SPLIT_STEM = re.compile(r"^(train|test|dev|val|validation)(-\d+-of-\d+)?$", re.IGNORECASE)


class BenchmarkError(ValueError):
    """A benchmark file or spec that cannot be evaluated; the message names the file, row and column and the fix."""


@dataclass
class BenchmarkSpec:
    """One entry of `trainer.eval_benchmarks` or one `--benchmark`: a file and how to evaluate it."""

    path: str
    name: str | None = None  # default: from the file name
    limit: int | None = None  # the first N questions (circular: N original questions with all their rotations)
    task: str | None = None  # one of TASKS; default: detected
    circular: bool | None = None  # default: on for MMBench-named files and files holding rotated copies
    max_new_tokens: int | None = None  # default: the caller's (trainer.eval_max_new_tokens)


@dataclass
class Question:
    row: int  # 1-based data row in the file (the header not counted)
    index: str
    question: str
    hint: str | None
    options: dict[str, str]  # letter -> text, in letter order (multiple choice only)
    answer: str | None  # the correct letter (multiple choice)
    references: list[str]  # reference answers (open questions)
    images: list[Any]  # bytes (encoded file), Path or PIL image; decoded when asked
    category: str | None = None
    l2_category: str | None = None
    group: str = ""  # circular evaluation: the original question's index

    def load_images(self) -> list[Image.Image]:
        return [_open_image(im).convert("RGB") for im in self.images]


@dataclass
class Benchmark:
    name: str
    path: Path
    task: str
    circular: bool  # score per group: correct only if every rotation is
    rotate: bool  # the rotations are made here (the file holds each question once)
    questions: list[Question] = field(default_factory=list)
    max_new_tokens: int | None = None

    @property
    def num_groups(self) -> int:
        return len({q.group for q in self.questions})


# ------------------------------------------------------------------------------------------------ specs
def parse_specs(entries, limit: int | None = None) -> list[BenchmarkSpec]:
    """Specs from config entries: a path string, or a mapping with BenchmarkSpec's keys (`path` required).
    `limit` applies where an entry has none. Names must be unique (they key the metrics)."""
    known = {f.name for f in fields(BenchmarkSpec)}
    specs = []
    for i, entry in enumerate(entries or []):
        if isinstance(entry, (str, Path)):
            spec = BenchmarkSpec(path=str(entry))
        elif hasattr(entry, "keys"):
            entry = {str(k): entry[k] for k in entry.keys()}
            unknown = sorted(set(entry) - known)
            if unknown or "path" not in entry:
                raise BenchmarkError(
                    f"benchmark entry {i} ({entry}): "
                    + (f"unknown key(s) {unknown}" if unknown else "no 'path'")
                    + f"; allowed keys: {', '.join(sorted(known))} (e.g. {{path: data/demo/bench_mcq.tsv, limit: 32}})"
                )
            spec = BenchmarkSpec(**entry)
        else:
            raise BenchmarkError(f"benchmark entry {i}: {entry!r} is neither a path nor a mapping with a 'path' key")
        if spec.limit is None:
            spec.limit = limit
        if spec.task is not None and spec.task not in TASKS:
            raise BenchmarkError(f"benchmark {spec.path}: task={spec.task!r}; expected one of {', '.join(TASKS)}")
        if spec.limit is not None and spec.limit < 1:
            raise BenchmarkError(f"benchmark {spec.path}: limit={spec.limit}; must be ≥ 1 (or null: all)")
        specs.append(spec)
    names = [benchmark_name(s) for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise BenchmarkError(f"benchmark name(s) {repeated} given twice; give each entry its own `name`")
    return specs


def benchmark_name(spec: BenchmarkSpec) -> str:
    """The spec's name, else the file stem; a Hub shard name (test-00000-of-00001) takes its folder's name."""
    if spec.name:
        return spec.name
    p = Path(spec.path)
    stem = p.name.split(".")[0]
    if _SPLIT_STEM.match(stem) and p.parent.name:
        return f"{p.parent.name}_{stem.split('-')[0]}"
    return stem


def resolve_path(path: str) -> Path:
    """As given (absolute, or relative to the working directory), else relative to the repository root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        found = p
    else:
        found = REPO_ROOT / p if (REPO_ROOT / p).exists() else p
    if not found.is_file():
        raise BenchmarkError(
            f"{path}: benchmark file not found (looked in {Path.cwd()} and {REPO_ROOT}); pass the path of a "
            "VLMEvalKit .tsv or of its Hub .parquet copy (nothing is downloaded)"
        )
    return found


# ------------------------------------------------------------------------------------------------ reading
def read_rows(path: Path) -> tuple[list[str], list[dict]]:
    """(columns, rows) of a .tsv or .parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return _read_tsv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise BenchmarkError(f"{path}: unknown benchmark format {suffix!r}; expected a VLMEvalKit .tsv or a .parquet")


def _read_tsv(path: Path) -> tuple[list[str], list[dict]]:
    csv.field_size_limit(sys.maxsize)  # base64 images are long fields
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter="\t")  # pandas' to_csv(sep="\t") quoting, as VLMEvalKit writes
            header = next(reader, None)
            if not header:
                raise BenchmarkError(f"{path}: empty file; expected a header row (index, question, answer, ...)")
            rows = []
            for n, values in enumerate(reader, start=1):
                if not values:
                    continue
                if len(values) != len(header):
                    raise BenchmarkError(
                        f"{path}: row {n} has {len(values)} tab-separated fields, the header {len(header)}; "
                        "fields with tabs or newlines must be quoted (pandas' to_csv(sep='\\t') does this)"
                    )
                rows.append(dict(zip(header, values)))
    except UnicodeDecodeError as e:
        raise BenchmarkError(f"{path}: not UTF-8 text ({e}); VLMEvalKit TSVs are UTF-8") from e
    return header, rows


def _read_parquet(path: Path) -> tuple[list[str], list[dict]]:
    try:
        import datasets
    except ImportError as e:
        raise BenchmarkError(f"{path}: reading parquet needs `datasets` (pip install 'datasets>=2.19')") from e
    import tempfile

    with tempfile.TemporaryDirectory() as cache:  # nothing left in the HF cache
        try:
            ds = datasets.Dataset.from_parquet(str(path), cache_dir=cache, keep_in_memory=True)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise BenchmarkError(f"{path}: cannot read as parquet ({type(e).__name__}: {e})") from e
        # Images as bytes (the file's encoding), not decoded PIL images: decoded when asked.
        for name, feature in ds.features.items():
            if isinstance(feature, datasets.Image):
                ds = ds.cast_column(name, datasets.Image(decode=False))
        return list(ds.column_names), [dict(r) for r in ds]


def _text(value) -> str | None:
    """A cell as text; empty cells and NaN (pandas' missing value, also as the text 'nan') are None."""
    if value is None:
        return None
    if isinstance(value, float):
        return None if value != value else format(value, "g")
    text = str(value)
    return None if text.strip() in ("", "nan", "NaN") else text


def _literal_list(text: str):
    """A list literal as VLMEvalKit writes it (Python repr or JSON), else None."""
    if not text.lstrip().startswith("["):
        return None
    for parse in (ast.literal_eval, json.loads):
        try:
            value = parse(text)
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, list):
            return value
    return None


# ------------------------------------------------------------------------------------------------ images
def _open_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (bytes, bytearray)):
        return Image.open(io.BytesIO(image))
    return Image.open(image)


def _check_image(image, where: str) -> Any:
    try:
        with _open_image(image) as im:
            im.verify()  # the header and structure, without decoding the pixels
    except Exception as e:  # PIL raises several types for bad files
        raise BenchmarkError(f"{where}: not a readable image ({type(e).__name__}: {e})") from e
    return image


class _Rows:
    """Image lookup across rows (a short `image` cell names the row whose image it shares)."""

    def __init__(self, path: Path, rows: list[dict]):
        self.path = path
        self.by_index = {str(r.get("index")): r for r in rows if _text(r.get("index")) is not None}

    def images(self, row: dict, where) -> list[Any]:
        cell = row.get("image")
        if cell is not None and not (isinstance(cell, str) and not cell.strip()):
            return self._cell_images(row, where("column image"))
        if _text(row.get("image_path")) is not None:
            cell = row["image_path"]
            paths = cell if isinstance(cell, list) else _literal_list(cell) or [cell]
            out = []
            for p in paths:
                full = (self.path.parent / str(p)).expanduser()
                if not full.is_file():
                    raise BenchmarkError(
                        f"{where('column image_path')}: {full} not found; image paths are relative to the "
                        f"benchmark file's folder"
                    )
                out.append(_check_image(full, where("column image_path")))
            return out
        raise BenchmarkError(f"{where('column image')}: no image; every question needs its image (or image_path)")

    def _cell_images(self, row: dict, at: str, depth: int = 0) -> list[Any]:
        cell = row["image"]
        if isinstance(cell, dict):  # a datasets Image feature: {"bytes": ..., "path": ...}
            cell = cell.get("bytes") or cell.get("path")
        if isinstance(cell, (bytes, bytearray, Image.Image)):
            return [_check_image(cell, at)]
        if isinstance(cell, list):
            return [im for item in cell for im in self._cell_images({"image": item}, at, depth)]
        text = str(cell).strip()
        items = _literal_list(text)
        if items is not None:
            return [im for item in items for im in self._cell_images({"image": item}, at, depth)]
        if len(text) <= 64 and text in self.by_index and depth < 2:  # shared image: another row's index
            return self._cell_images(self.by_index[text], at, depth + 1)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BenchmarkError(
                f"{at}: not valid base64 ({e}); the column holds the image file's bytes in base64 (or the index of "
                "the row whose image it shares); put file paths in an `image_path` column instead"
            ) from e
        return [_check_image(data, at)]


# ------------------------------------------------------------------------------------------------ tasks
def detect_task(name: str, has_options: bool, references: list[list[str]]) -> str:
    """The scoring rule for a benchmark (see the module docstring)."""
    if has_options:
        return "mcq"
    lname = name.lower()
    if "docvqa" in lname or "infovqa" in lname:
        return "anls"
    if "chartqa" in lname:
        return "relaxed"
    if "ocrbench" in lname:
        return "ocrbench"
    if references and all(r.strip().lower() in ("yes", "no") for refs in references for r in refs):
        return "yesno"
    return "vqa"


def load_benchmark(spec: BenchmarkSpec) -> Benchmark:
    """Read and check a benchmark file (the first `spec.limit` questions); every image is checked, none decoded."""
    path = resolve_path(spec.path)
    name = benchmark_name(spec)
    lname = name.lower()
    columns, rows = read_rows(path)
    if not rows:
        raise BenchmarkError(f"{path}: no rows")
    if "question" not in columns:
        raise BenchmarkError(f"{path}: no 'question' column (columns: {', '.join(columns)}); not a VLMEvalKit file")
    answer_col = next((c for c in ANSWER_COLUMNS if c in columns), None)
    if answer_col is None:
        raise BenchmarkError(
            f"{path}: no 'answer' column: this split has no references (e.g. a TEST split scored on a server); "
            "use a split with answers (MMBench_DEV_EN, not MMBench_TEST_EN)"
        )
    if not any(c in columns for c in IMAGE_COLUMNS):
        raise BenchmarkError(f"{path}: no 'image' (base64) or 'image_path' column")
    letters = [c for c in OPTION_LETTERS if c in columns]
    has_options = len(letters) >= 2 and any(_text(r.get("B")) is not None for r in rows)
    task = spec.task
    if task == "mcq" and not has_options:
        raise BenchmarkError(f"{path}: task=mcq but no option columns A, B, ...")
    # Rotated copies: a multiple-choice row at index + k * 1e6 whose original index is in the file too (large
    # indices alone are no sign: VQA files may use question ids).
    indices = {_int(r.get("index")) for r in rows}
    has_copies = has_options and any(i >= CIRCULAR_OFFSET and i % CIRCULAR_OFFSET in indices for i in indices)
    circular = spec.circular if spec.circular is not None else has_options and (has_copies or "mmbench" in lname)
    lookup = _Rows(path, rows)

    def where_for(n: int, row: dict):
        return lambda col: f"{path}: row {n} (index {_text(row.get('index'))}), {col}"

    questions, groups = [], []
    references = []
    for n, row in enumerate(rows, start=1):
        where = where_for(n, row)
        index = _text(row.get("index")) or str(n - 1)
        copy = has_copies and _int(index) >= CIRCULAR_OFFSET
        if copy and not circular:
            continue  # a rotated copy, and this evaluation is not circular
        group = str(_int(index) % CIRCULAR_OFFSET) if has_copies and _int(index) >= 0 else index
        if group not in groups:
            if spec.limit is not None and len(groups) >= spec.limit:
                continue
            groups.append(group)
        question = _text(row.get("question"))
        if question is None:
            raise BenchmarkError(f"{where('column question')}: empty question")
        answer = row.get(answer_col)
        if isinstance(answer, list):
            refs = [str(a) for a in answer]
        else:
            text = _text(answer)
            if text is None:
                raise BenchmarkError(f"{where(f'column {answer_col}')}: empty answer; every question needs one")
            refs = [str(a) for a in _literal_list(text) or [text]]
        references.append(refs)
        options = {c: _text(row.get(c)) for c in letters}
        options = {c: t for c, t in options.items() if t is not None}
        questions.append(
            Question(
                row=n,
                index=index,
                question=question,
                hint=_text(row.get("hint")),
                options=options,
                answer=refs[0].strip() if has_options else None,
                references=refs,
                images=lookup.images(row, where),
                category=_text(row.get("category")),
                l2_category=_text(row.get("l2-category") or row.get("l2_category")),
                group=group,
            )
        )
    if not questions:
        raise BenchmarkError(f"{path}: no questions to ask (every row is a rotated copy and circular=false?)")
    task = task or detect_task(name, has_options, references)
    if task == "mcq":
        for q in questions:
            where = where_for(q.row, {"index": q.index})
            if not q.options:  # an open question among multiple-choice ones (MMMU): asked and scored as VQA
                q.answer = None
                continue
            if len(q.options) < 2:
                raise BenchmarkError(f"{where('columns A, B, ...')}: 1 option; a question needs ≥ 2 (or none: open)")
            if q.answer not in q.options:
                raise BenchmarkError(
                    f"{where(f'column {answer_col}')}: {q.answer!r} is not one of this row's option letters "
                    f"{', '.join(q.options)}; a multiple-choice answer is the correct option's letter"
                )
    if circular and task != "mcq":
        raise BenchmarkError(f"{path}: circular evaluation needs a multiple-choice benchmark (task={task})")
    return Benchmark(
        name=name,
        path=path,
        task=task,
        circular=circular,
        rotate=circular and not has_copies,
        questions=questions,
        max_new_tokens=spec.max_new_tokens,
    )


def _int(value) -> int:
    """The index as an integer (-1 when it is not one: no circular copies then)."""
    try:
        return int(float(str(value)))
    except (TypeError, ValueError):
        return -1
