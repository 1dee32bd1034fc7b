"""SFT and eval datasets: the records of a data source (`records`) in one of several layouts (`layouts`),
validated eagerly.

The record layout (native ``messages``, OpenAI list content, LLaVA, ShareGPT, the_cauldron, ms-swift) is detected
per source from its first record that has one, after ``columns`` renamed keys, and reported in `DataReport`.
Native records are ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "images":
["rel/path.png", ...]}`` with one ``<image>`` placeholder in the user turns per image, in order.

Image paths are relative to the data file's directory (a dataset directory itself), or to ``image_root`` when
given; images embedded in the data (``{"bytes", "path"}``) are read from their bytes. Other keys of a record are
kept as ``meta`` (the demo data stores its question type there).

Every record is checked when the dataset is built: it parses, the schema and roles are valid, each image opens and
decodes (rotated by its EXIF orientation only with ``exif_transpose``, off by default as in the official loader),
the placeholder count matches, there is an assistant turn, and the token length fits ``max_length`` under the
``overlong`` policy. A bad record either raises a `SampleError` naming its place (``file:line``) and the reason
(``on_bad_sample="error"``) or is skipped and counted by reason in the dataset's `DataReport` (``"skip"``). The
``overlong`` policy decides for over-long samples (``"error"`` raises, ``"skip"`` skips and counts,
``"truncate"`` cuts the tail); when truncation is impossible (it would cut an image, or leave no answer token)
``on_bad_sample`` decides.

A dataset keeps only the row numbers of the records it kept: a sample is read from its source again, parsed and
its images opened in ``__getitem__``, so a memory-mapped source stays out of RAM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..processor import DeepseekVL2Processor, SampleError
from . import layouts
from .bad_samples import ON_BAD_SAMPLE
from .images import ImageRef, load_image, resolve_image
from .records import RecordSource, open_source
from .report import DataReport

OVERLONG_REASONS = ("overlong",)  # decided by the `overlong` policy; all other reasons by `on_bad_sample`


def convert_llava(record: dict) -> tuple[list[dict], list]:
    """LLaVA `conversations` -> (messages, images), missing placeholders added (see `layouts`)."""
    parsed = layouts.parse(record, "llava")
    return parsed.messages, parsed.images


def parse_record(record: Any, layout: str | None = None) -> tuple[list[dict], list, dict]:
    """A record in any layout (`layouts`) -> (messages, images, meta); raises SampleError."""
    parsed = layouts.parse(record, layout)
    return parsed.messages, parsed.images, parsed.meta


@dataclass
class Sample:
    location: str
    messages: list[dict]
    images: list[ImageRef]
    meta: dict

    @property
    def image_paths(self) -> list[Path | None]:
        return [ref.path for ref in self.images]


class _Samples:
    """`dataset.samples[i]`: the kept records as `Sample`s, read from the source when asked for."""

    def __init__(self, dataset: _ValidatedData):
        self._dataset = dataset

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int) -> Sample:
        return self._dataset.sample(index)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class _ValidatedData:
    """Reads a data source and keeps the rows of the records that will encode; shared by SFT and eval datasets."""

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
        split: str | None = None,
        purpose: str = "train",  # which split a dataset directory defaults to: "train" or "eval" (records.py)
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
        self.source: RecordSource = open_source(self.path, split, purpose)
        self.image_root = Path(image_root) if image_root is not None else self.source.image_root
        self.columns = dict(columns or {})
        self.exif_transpose = exif_transpose
        self.report = DataReport(str(self.path))
        self.rows: list[int] = []  # the source rows of the kept records
        self.samples = _Samples(self)
        for row in range(len(self.source)):
            self.report.total += 1
            try:
                record = self._record(row)
                if self.report.layout is None:  # the file's layout: the first record's that has one
                    self.report.layout = layouts.detect_layout(record)
                sample, added = self._parse(row, record)
                self._check_sample(sample.messages, self._image_sizes(sample.images))
                self.rows.append(row)
                self.report.kept += 1
                self.report.placeholders_added += added
            except SampleError as e:
                self._handle(e.at(self.source.location(row)))

    def _record(self, row: int) -> Any:
        record = self.source.record(row)
        if isinstance(record, SampleError):
            raise record
        return layouts.rename_columns(record, self.columns)

    def _parse(self, row: int, record: Any) -> tuple[Sample, int]:
        parsed = layouts.parse(record, self.report.layout)
        images = [resolve_image(image, self.image_root) for image in parsed.images]
        return Sample(self.source.location(row), parsed.messages, images, parsed.meta), parsed.placeholders_added

    def _image_sizes(self, images: list[ImageRef]) -> list[tuple[int, int]]:
        return [load_image(ref, self.exif_transpose).size for ref in images]

    def _handle(self, error: SampleError) -> None:
        policy = self.on_bad_sample
        if error.reason in OVERLONG_REASONS:
            policy = "error" if self.overlong == "error" else "skip"
        if policy == "error":
            raise error
        self.report.skip(error)

    def _check_sample(self, messages: list[dict], sizes: list[tuple[int, int]]) -> None:
        self.processor.check(messages, sizes, self.generation, self.max_length, self.overlong)

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, index: int) -> Sample:
        """The kept record `index`, read from the source again."""
        row = self.rows[index]
        try:
            return self._parse(row, self._record(row))[0]
        except SampleError as e:  # the file changed since validation: still say where
            raise e.at(self.source.location(row)) from e

    def _encode(self, index: int) -> dict:
        sample = self.sample(index)
        try:
            images = [load_image(ref, self.exif_transpose) for ref in sample.images]
            return self.processor.encode(sample.messages, images, self.generation, self.max_length, self.overlong)
        except SampleError as e:  # the file changed since validation: still say where
            raise e.at(sample.location) from e


class SFTDataset(_ValidatedData):
    """Training samples: `dataset[i]` is `processor.encode(messages, images)` (labels on the answers)."""

    def __getitem__(self, index: int) -> dict:
        return self._encode(index)


class EvalDataset(_ValidatedData):
    """Exact-match eval pairs: `dataset[i]` is (prompt encoding, reference answer).

    The prompt is encoded with `generation=True`: the record's last message must be the assistant answer,
    which is dropped from the ids and returned stripped as the reference. Prompts are never truncated; an
    over-long prompt is handled by `on_bad_sample`.
    """

    generation = True

    def __init__(self, path: str | Path, processor: DeepseekVL2Processor, **options):
        """As `SFTDataset`, without `overlong` (prompts are never truncated) and with the eval split of a dataset
        directory by default."""
        super().__init__(path, processor, **{"purpose": "eval", **options, "overlong": "skip"})

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
        return self.sample(index).messages[-1]["content"].strip()

    def __getitem__(self, index: int) -> tuple[dict, str]:
        sample_answer = self.answer(index)
        return self._encode(index), sample_answer


def collate_eval(pairs: list[tuple[dict, str]], collator) -> tuple[dict, list[str]]:
    """Batch eval pairs with a (left-padding) Collator: (batch, reference answers)."""
    encodings, answers = zip(*pairs)
    return collator(list(encodings)), list(answers)
