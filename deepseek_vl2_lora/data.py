"""SFT and eval datasets: JSONL or JSON-list files of records in one of several layouts, validated eagerly.

Two file layouts are read:

* ``*.jsonl``: one record per line. Blank lines are ignored; positions are reported as ``file:LINE``
  (1-based).
* ``*.json``: a JSON list of records. Positions are reported as ``file[INDEX]`` (0-based).

The record layout (native ``messages``, OpenAI list content, LLaVA, ShareGPT, the_cauldron, ms-swift) is detected
per file from its first record that has one, after ``columns`` renamed keys, and reported in `DataReport`;
`deepseek_vl2_lora.layouts` describes them and the placeholder rule. Native records are
``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "images": ["rel/path.png", ...]}``
with one ``<image>`` placeholder in the user turns per image, in order.

Image paths are relative to the data file's directory, or to ``image_root`` when given. Other keys of a record
are kept as ``meta`` (the demo data stores its question type there).

Every record is checked when the dataset is built: the JSON parses, the schema and roles are valid, each image
opens and decodes (rotated by its EXIF orientation only with ``exif_transpose``, off by default as in the official
loader), the placeholder count matches, there is an assistant turn, and the token length fits ``max_length``
under the ``overlong`` policy. A bad record either raises a
`SampleError` naming ``file:line`` and the reason (``on_bad_sample="error"``) or is skipped and counted by
reason in the dataset's `DataReport` (``"skip"``). The ``overlong`` policy decides for over-long samples
(``"error"`` raises, ``"skip"`` skips and counts, ``"truncate"`` cuts the tail); when truncation is impossible
(it would cut an image, or leave no answer token) ``on_bad_sample`` decides. Pixels are not kept: images are
reopened in ``__getitem__``.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps

from . import layouts
from .processor import DeepseekVL2Processor, SampleError

ON_BAD_SAMPLE = ("error", "skip")
LLAVA_ROLES = layouts.LLAVA_ROLES
log = logging.getLogger(__name__)

OVERLONG_REASONS = ("overlong",)  # decided by the `overlong` policy; all other reasons by `on_bad_sample`


# ----------------------------------------------------------------------------------------------------------
# Report


@dataclass
class DataReport:
    """What validation found in one data file: kept records and skipped ones by reason."""

    source: str
    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> first few error messages
    layout: str | None = None  # the record layout detected (`layouts`); None: no record had one
    placeholders_added: int = 0  # <image> placeholders put at the start of the first user turn (kept records)
    skipped_at_train: Counter = field(default_factory=Counter)  # by reason: samples gone bad after validation

    max_examples = 3

    def skip(self, error: SampleError) -> None:
        self.skipped[error.reason] += 1
        shown = self.examples.setdefault(error.reason, [])
        if len(shown) < self.max_examples:
            shown.append(str(error))

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "total": self.total,
            "kept": self.kept,
            "layout": self.layout,
            "placeholders_added": self.placeholders_added,
            "skipped": dict(sorted(self.skipped.items())),
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
            "skipped_at_train": dict(sorted(self.skipped_at_train.items())),
        }

    def summary(self) -> str:
        """One line: source, layout, records kept, placeholders added (and skipped records, if any)."""
        parts = [f"{self.kept} records"]
        if self.placeholders_added:
            parts.append(f"{self.placeholders_added} placeholders added")
        if self.num_skipped:
            parts.append(f"{self.num_skipped} skipped")
        return f"{self.source}: layout {self.layout or 'none'} ({', '.join(parts)})"

    def __str__(self) -> str:
        lines = [f"{self.source}: {self.total} records, {self.kept} kept, {self.num_skipped} skipped"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  {reason}: {count}")
            lines += [f"    e.g. {msg}" for msg in self.examples.get(reason, [])]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Reading records


def read_records(path: Path) -> list[tuple[str, Any]]:
    """[(location, record-or-SampleError)] in file order; a .json file that fails to parse is fatal."""
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        return _read_json_list(path)
    raise SampleError("bad_file", "data file must end in .jsonl or .json", str(path))


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise SampleError("bad_file", "data file not found", str(path)) from e
    except OSError as e:
        raise SampleError("bad_file", f"cannot read data file ({e})", str(path)) from e


def _parse_json(raw: bytes) -> Any:
    return json.loads(raw.decode("utf-8"))


_JSON_ERRORS = (json.JSONDecodeError, UnicodeDecodeError, RecursionError)


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    # Lines are decoded one by one so that a bad byte sequence only spoils its own line.
    out = []
    for lineno, line in enumerate(_read_bytes(path).split(b"\n"), start=1):
        if not line.strip():
            continue
        loc = f"{path}:{lineno}"
        try:
            out.append((loc, _parse_json(line)))
        except _JSON_ERRORS as e:
            out.append((loc, SampleError("malformed_json", f"invalid JSON ({e})", loc)))
    return out


def _read_json_list(path: Path) -> list[tuple[str, Any]]:
    try:
        data = _parse_json(_read_bytes(path))
    except _JSON_ERRORS as e:
        raise SampleError("malformed_json", f"invalid JSON ({e})", str(path)) from e
    if not isinstance(data, list):
        raise SampleError("bad_schema", "a .json data file must hold a list of records", str(path))
    return [(f"{path}[{i}]", record) for i, record in enumerate(data)]


def convert_llava(record: dict) -> tuple[list[dict], list[str]]:
    """LLaVA `conversations` -> (messages, image paths), missing placeholders added (see `layouts`)."""
    parsed = layouts.parse(record, "llava")
    return parsed.messages, parsed.images


def parse_record(record: Any, layout: str | None = None) -> tuple[list[dict], list[str], dict]:
    """A record in any layout (`layouts`) -> (messages, image paths, meta); raises SampleError."""
    parsed = layouts.parse(record, layout)
    return parsed.messages, parsed.images, parsed.meta


# ----------------------------------------------------------------------------------------------------------
# Images


def load_image(path: Path, exif_transpose: bool = False) -> Image.Image:
    """Open and decode to RGB, as DeepSeek-VL2's official loader (`Image.open(p).convert("RGB")`); with
    `exif_transpose`, rotated by the EXIF orientation tag first. Failures become SampleErrors by kind."""
    if not path.is_file():  # is_file() is False (not an exception) for unrepresentable paths too
        raise SampleError("missing_image", f"image not found: {path}")
    try:
        if os.path.getsize(path) == 0:
            raise SampleError("empty_image", f"image file is empty: {path}")
    except OSError as e:
        raise SampleError("missing_image", f"cannot access image {path} ({e})") from e
    try:
        with Image.open(path) as im:
            if exif_transpose:
                im = ImageOps.exif_transpose(im)
            return im.convert("RGB")  # convert() decodes the whole image, so truncation shows up here
    except SampleError:
        raise
    except Exception as e:  # PIL raises many types for bad files (OSError, SyntaxError, DecompressionBomb...)
        raise SampleError("corrupt_image", f"cannot decode image {path} ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------------------
# Datasets


@dataclass
class Sample:
    location: str
    messages: list[dict]
    image_paths: list[Path]
    meta: dict


class _ValidatedData:
    """Reads a data file and keeps only the records that will encode; shared by SFT and eval datasets."""

    generation = False

    def __init__(
        self,
        path: str | Path,
        processor: DeepseekVL2Processor,
        on_bad_sample: str = "error",
        max_length: int | None = None,
        overlong: str = "error",
        image_root: str | Path | None = None,
        columns: dict[str, str] | None = None,
        exif_transpose: bool = False,
    ):
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        if overlong not in ("error", "skip", "truncate"):
            raise ValueError(f"overlong must be 'error', 'skip' or 'truncate', got {overlong!r}")
        self.path = Path(path)
        self.processor = processor
        self.on_bad_sample = on_bad_sample
        self.max_length = max_length
        self.overlong = overlong
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.columns = dict(columns or {})
        self.exif_transpose = exif_transpose
        self.report = DataReport(str(self.path))
        self.samples: list[Sample] = []
        for location, record in read_records(self.path):
            self.report.total += 1
            try:
                if isinstance(record, SampleError):
                    raise record
                record = layouts.rename_columns(record, self.columns)
                if self.report.layout is None:  # the file's layout: the first record's that has one
                    self.report.layout = layouts.detect_layout(record)
                sample, added = self._validate(location, record)
                self.samples.append(sample)
                self.report.kept += 1
                self.report.placeholders_added += added
            except SampleError as e:
                self._handle(e.at(location))

    def _handle(self, error: SampleError) -> None:
        policy = self.on_bad_sample
        if error.reason in OVERLONG_REASONS:
            policy = "error" if self.overlong == "error" else "skip"
        if policy == "error":
            raise error
        self.report.skip(error)

    def _validate(self, location: str, record: Any) -> tuple[Sample, int]:
        parsed = layouts.parse(record, self.report.layout)
        resolved = [self.image_root / p for p in parsed.images]
        sizes = [load_image(p, self.exif_transpose).size for p in resolved]
        self._check_sample(parsed.messages, sizes)
        return Sample(location, parsed.messages, resolved, parsed.meta), parsed.placeholders_added

    def _check_sample(self, messages: list[dict], sizes: list[tuple[int, int]]) -> None:
        self.processor.check(messages, sizes, self.generation, self.max_length, self.overlong)

    def __len__(self) -> int:
        return len(self.samples)

    def _encode(self, index: int) -> dict:
        sample = self.samples[index]
        try:
            images = [load_image(p, self.exif_transpose) for p in sample.image_paths]
            return self.processor.encode(sample.messages, images, self.generation, self.max_length, self.overlong)
        except SampleError as e:  # the file changed since validation: still say where
            raise e.at(sample.location) from e


class SFTDataset(_ValidatedData):
    """Training samples: `dataset[i]` is `processor.encode(messages, images)` (labels on the answers)."""

    def __init__(
        self,
        path: str | Path,
        processor: DeepseekVL2Processor,
        on_bad_sample: str = "error",
        max_length: int | None = None,
        overlong: str = "error",
        image_root: str | Path | None = None,
        columns: dict[str, str] | None = None,
        exif_transpose: bool = False,
    ):
        super().__init__(path, processor, on_bad_sample, max_length, overlong, image_root, columns, exif_transpose)

    def __getitem__(self, index: int) -> dict:
        return self._encode(index)


class EvalDataset(_ValidatedData):
    """Exact-match eval pairs: `dataset[i]` is (prompt encoding, reference answer).

    The prompt is encoded with `generation=True`: the record's last message must be the assistant answer,
    which is dropped from the ids and returned stripped as the reference. Prompts are never truncated; an
    over-long prompt is handled by `on_bad_sample`.
    """

    generation = True

    def __init__(
        self,
        path: str | Path,
        processor: DeepseekVL2Processor,
        on_bad_sample: str = "error",
        max_length: int | None = None,
        image_root: str | Path | None = None,
        columns: dict[str, str] | None = None,
        exif_transpose: bool = False,
    ):
        super().__init__(path, processor, on_bad_sample, max_length, "skip", image_root, columns, exif_transpose)

    def _handle(self, error: SampleError) -> None:
        # Over-long prompts cannot be truncated, so they follow on_bad_sample like any other bad record.
        if self.on_bad_sample == "error":
            raise error
        self.report.skip(error)

    def _check_sample(self, messages: list[dict], sizes: list[tuple[int, int]]) -> None:
        last = messages[-1] if isinstance(messages, list) and messages else None
        if not (isinstance(last, dict) and last.get("role") in ("assistant", "<|Assistant|>")):
            # Run the structural checks first so schema errors keep their own reason.
            self.processor.plan(messages, sizes, generation=True)
            msg = "an eval record must end with the reference assistant answer"
            raise SampleError("no_assistant_turn", msg)
        super()._check_sample(messages, sizes)

    def answer(self, index: int) -> str:
        return self.samples[index].messages[-1]["content"].strip()

    def __getitem__(self, index: int) -> tuple[dict, str]:
        return self._encode(index), self.answer(index)


def collate_eval(pairs: list[tuple[dict, str]], collator) -> tuple[dict, list[str]]:
    """Batch eval pairs with a (left-padding) Collator: (batch, reference answers)."""
    encodings, answers = zip(*pairs)
    return collator(list(encodings)), list(answers)


# ----------------------------------------------------------------------------------------------------------
# Bad samples at train time


@dataclass
class TrainItem:
    """A training sample as the loader passes it on: its encoding (None: it failed under ``error``), the
    bad samples it replaced (one line each, ``file:line: message [reason]``) and their reasons."""

    encoding: dict | None
    skipped: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


class SkipBadSamples(torch.utils.data.Dataset):
    """A training set whose samples may go bad after validation (an image deleted or unreadable mid-run).

    ``items[i]`` encodes ``dataset[i]``. When that raises a SampleError (or the image fails to open), under
    ``on_bad_sample="skip"`` the next index ``i+1, i+2, ...`` (mod the set size) is encoded instead and the bad
    one is reported with it, so the batch stays full and the substitution depends on the files only (a resumed
    run makes the same one). Under ``"error"`` the failure comes back as the item (``encoding=None``) and
    `collate_items` / `unwrap_batch` raise it in the main process as one SampleError line naming ``file:line``:
    an exception raised in a DataLoader worker would otherwise arrive wrapped in its worker's traceback.
    """

    def __init__(self, dataset, on_bad_sample: str = "error"):
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        self.dataset, self.on_bad_sample = dataset, on_bad_sample

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> TrainItem:
        item = TrainItem(None)
        for k in range(len(self.dataset)):
            try:
                item.encoding = self.dataset[(index + k) % len(self.dataset)]
                return item
            except (SampleError, OSError) as e:
                error = e if isinstance(e, SampleError) else SampleError("corrupt_image", f"{type(e).__name__}: {e}")
                item.skipped.append(str(error))
                item.reasons.append(error.reason)
                if self.on_bad_sample == "error":
                    return item
        return item  # every sample failed: unwrap_batch says so


class CollateItems:
    """Collate TrainItems with `collator`: (batch or None, the items' skipped lines and reasons, the error line
    or None). Picklable, for DataLoader workers."""

    def __init__(self, collator, on_bad_sample: str = "error"):
        self.collator, self.on_bad_sample = collator, on_bad_sample

    def __call__(self, items: list[TrainItem]) -> tuple[dict | None, list[str], list[str], str | None]:
        skipped = [line for it in items for line in it.skipped]
        reasons = [r for it in items for r in it.reasons]
        failed = [it for it in items if it.encoding is None]
        if failed:
            why = failed[0].skipped[-1] if self.on_bad_sample == "error" else "every training sample failed to load"
            return None, skipped, reasons, why
        return self.collator([it.encoding for it in items]), skipped, reasons, None


def unwrap_batch(collated, report: DataReport | None = None) -> dict:
    """The batch from `CollateItems`, its skipped samples counted into ``report.skipped_at_train`` (and logged);
    a failed sample raised here as one SampleError line (reason ``at_train``)."""
    batch, skipped, reasons, error = collated
    if error is not None:
        raise SampleError("at_train", f"while training: {error}")
    for line, reason in zip(skipped, reasons):
        log.warning("skipped a bad training sample (data.on_bad_sample=skip): %s", line)
        if report is not None:
            report.skipped_at_train[reason] += 1
    return batch
