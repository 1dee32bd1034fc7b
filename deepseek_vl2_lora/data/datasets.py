"""SFT and eval datasets: the records of a data source (`records`) in one of several layouts (`layouts`),
validated eagerly.

The record layout (native ``messages``, OpenAI list content, LLaVA, ShareGPT, the_cauldron, ms-swift) is detected
per source from its first record that has one, after ``columns`` renamed keys, and reported in `DataReport`.
Native records are ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "images":
["rel/path.png", ...]}`` with one ``<image>`` placeholder in the user turns per image, in order.

Image paths are relative to the data file's directory (a dataset directory itself), or to ``image_root`` when
given; images embedded in the data (``{"bytes", "path"}``) are read from their bytes. Other keys of a record are
kept as ``meta`` (the demo data stores its question type there).

Every record is checked when the dataset is built: it parses, the schema and roles are valid, each image's header
reads (its size, rotated by its EXIF orientation only with ``exif_transpose``, off by default as in the official
loader; no pixels are decoded: a file damaged past its header fails when the sample is encoded, a counted
train-time skip or one error line, `bad_samples`) and its pixel count is within ``max_image_pixels`` (above it:
``large_image`` rejects, reason ``image_too_large``, or resizes once into the cache), the placeholder count
matches, there is an assistant turn, and the token length fits ``max_length`` under the
``overlong`` policy. A bad record either raises a `SampleError` naming its place (``file:line``) and the reason
(``on_bad_sample="error"``) or is skipped and counted by reason in the dataset's `DataReport` (``"skip"``). The
``overlong`` policy decides for over-long samples (``"error"`` raises, ``"skip"`` skips and counts,
``"truncate"`` cuts the tail); when truncation is impossible (it would cut an image, or leave no answer token)
``on_bad_sample`` decides.

What validation found is cached per data source and settings, and image headers per file (`validation_cache`):
a restart, a resume or another rank of the run reads the outcome and stats the images instead of validating.

A dataset keeps only the row numbers of the records it kept and their token lengths (``lengths``: what validation
computed from the image headers, which token-budget batching bins by): a sample is read from its source again,
parsed and its images opened in ``__getitem__``, so a memory-mapped source stays out of RAM.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import layouts
from .bad_samples import ON_BAD_SAMPLE
from .images import DEFAULT_MAX_IMAGE_PIXELS, ImageLimits, ImageRef, load_image, oriented_size, resolve_image
from .processor import DeepseekVL2Processor, SampleError
from .records import RecordSource, open_source
from .report import DataReport
from .validation_cache import (
    CACHE_VERSION,
    SourceEntry,
    digest,
    file_stamp,
    image_cache,
    is_racy,
    is_validator,
    resolve_cache_dir,
    source_fingerprint,
)

log = logging.getLogger(__name__)

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
    """Reads a data source and keeps the rows of the records that will encode; shared by SFT and eval datasets.

    Validation reads image headers only (`images.probe_header`) and is cached (`validation_cache`): a second
    construction with the same files and settings stats the images and reads the outcome; under several ranks
    only local rank 0 validates."""

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
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        large_image: str = "reject",
        cache_dir: Any = None,  # None: the default cache directory; False / "none": no cache (validation_cache)
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
        self._read_ns = time.time_ns()  # files modified after (or just before) this are not cached
        self.source: RecordSource = open_source(self.path, split, purpose)
        self.image_root = Path(image_root) if image_root is not None else self.source.image_root
        self.columns = dict(columns or {})
        self.exif_transpose = exif_transpose
        self.cache_dir = resolve_cache_dir(cache_dir)
        resized_dir = self.cache_dir / "resized" if self.cache_dir is not None else None
        self.limits = ImageLimits(max_image_pixels, large_image, resized_dir)
        self.report = DataReport(str(self.path))
        self.rows: list[int] = []  # the source rows of the kept records
        self.lengths: list[int] = []  # each kept record's token length, as validation computed it (no pixels)
        self.samples = _Samples(self)
        self._validate()

    # -- validation -----------------------------------------------------------------------------------------
    def _cache_entry(self) -> SourceEntry | None:
        fingerprint = getattr(self.processor, "fingerprint", None)
        if self.cache_dir is None or fingerprint is None:  # (a processor not from files: no source cache)
            return None
        self._fingerprint = source_fingerprint(self.path)
        key = {
            "kind": type(self).__name__,
            "generation": self.generation,
            "source": self._fingerprint,
            "split": getattr(self.source, "split", None),
            "processor": fingerprint,
            "max_length": self.max_length,
            "overlong": self.overlong,
            "on_bad_sample": self.on_bad_sample,
            "columns": sorted(self.columns.items()),
            "image_root": os.path.abspath(self.image_root),
            "exif_transpose": self.exif_transpose,
            "max_image_pixels": self.limits.max_pixels,
            "large_image": self.limits.large_image,
            "version": CACHE_VERSION,
        }
        return SourceEntry(self.cache_dir, digest(key))

    def _validate(self) -> None:
        """Every row's outcome (kept, or skipped with its error), from the cache where it is still true."""
        started = time.perf_counter()
        images = image_cache(self.cache_dir)
        entry = self._cache_entry()
        validator = is_validator()
        state = entry.load(accept_racy=not validator) if entry is not None else None
        if entry is not None and state is None and not validator:
            state = entry.wait()  # local rank 0 validates (validation_cache)
        parsed = self._read_state(state, entry) if state is not None else None
        if parsed is not None:
            outcomes, layout, table, row_images = parsed
            changed = table.changed()
            rows = sorted(r for r, used in row_images.items() if changed.intersection(used))
            if rows:
                log.info("%s: %d image(s) changed since validation: checking their %d record(s) again",
                         self.path, len(changed), len(rows))  # fmt: skip
                self.report.layout = layout
                self._run(rows, outcomes, table, row_images, images, None)
                images.release()
                if validator:
                    self._save(entry, outcomes, table, row_images)
            how = f"from the validation cache ({len(rows)} record(s) checked again)"
        else:
            outcomes, table, row_images = [None] * len(self.source), _ImageTable([]), {}
            if entry is not None:
                entry.start()
            try:
                self._run(range(len(self.source)), outcomes, table, row_images, images, entry)
            except BaseException as e:
                if entry is not None:
                    entry.finish(e if isinstance(e, SampleError) else None)
                images.release()
                raise
            layout = self.report.layout
            images.release()
            if entry is not None:
                self._save(entry, outcomes, table, row_images)
                entry.finish()
            how = "validated"
        self.report.layout = layout
        for row, outcome in enumerate(outcomes):
            self.report.total += 1
            if len(outcome) == 2:
                self.rows.append(row)
                self.lengths.append(outcome[1])
                self.report.kept += 1
                self.report.placeholders_added += outcome[0]
            else:
                self.report.skip(SampleError(*outcome))
        log.info("%s: %d records %s in %.1f s", self.path, len(outcomes), how, time.perf_counter() - started)

    def _read_state(self, state: dict, entry: SourceEntry) -> tuple | None:
        """(outcomes, layout, image table, row -> image indices) of a cache entry; None (and one warning) when it
        does not hold them for this source."""
        try:
            outcomes, layout = state["outcomes"], state["layout"]
            table = _ImageTable(state["images"])
            row_images = {int(k): [int(i) for i in v] for k, v in state["row_images"].items()}
            ok = len(outcomes) == len(self.source) and (layout is None or isinstance(layout, str))
            ok = ok and all(isinstance(o, list) and len(o) in (2, 3) for o in outcomes)
            ok = ok and all(len(s) == 3 for s in table.stamps) and all(i < len(table.stamps) for v in
                                                                         row_images.values() for i in v)  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError):
            ok = False
        if not ok:
            log.warning("ignoring validation cache entry %s: not an entry for %s; it will be rebuilt", entry.path,
                        self.path)  # fmt: skip
            return None
        return outcomes, layout, table, row_images

    def _save(self, entry: SourceEntry, outcomes: list, table: _ImageTable, row_images: dict) -> None:
        # A file modified just before it was read may change again without its stamp changing: the entry then
        # serves this run's other ranks only (a later start validates again).
        racy = is_racy(self._fingerprint + table.stamps, self._read_ns)
        if racy:
            log.info("%s: a file changed within the last second: validated again at the next start", self.path)
        entry.save({"layout": self.report.layout, "outcomes": outcomes, "images": table.stamps,
                    "row_images": row_images, "racy": racy})  # fmt: skip

    def _run(self, rows, outcomes: list, table: _ImageTable, row_images: dict, images, entry) -> None:
        """Validate `rows` into `outcomes`: [placeholders added, token length] (kept) or [reason, message,
        location]."""
        for k, row in enumerate(rows):
            if entry is not None and k % 256 == 0:
                entry.heartbeat()
            row_images.pop(row, None)
            try:
                record = self._record(row)
                if self.report.layout is None:  # the file's layout: the first record's that has one
                    self.report.layout = layouts.detect_layout(record)
                sample, added = self._parse(row, record)
                used, sizes = [], []
                for ref in sample.images:
                    stamp = None
                    if ref.data is None:
                        stamp = file_stamp(ref.path)
                        used.append(table.add(stamp or [os.path.abspath(ref.path), None, None]))
                        row_images[row] = used
                    size = oriented_size(images.header(ref, stamp), self.exif_transpose)
                    sizes.append(self.limits.check(ref, size, self.exif_transpose))
                outcomes[row] = [added, self._check_sample(sample.messages, sizes)]
            except SampleError as e:
                error = e.at(self.source.location(row))
                if self._policy(error) == "error":
                    raise error from None
                outcomes[row] = [error.reason, error.message, error.location]

    def _record(self, row: int) -> Any:
        record = self.source.record(row)
        if isinstance(record, SampleError):
            raise record
        return layouts.rename_columns(record, self.columns)

    def _parse(self, row: int, record: Any) -> tuple[Sample, int]:
        parsed = layouts.parse(record, self.report.layout)
        images = [resolve_image(image, self.image_root) for image in parsed.images]
        return Sample(self.source.location(row), parsed.messages, images, parsed.meta), parsed.placeholders_added

    def _policy(self, error: SampleError) -> str:
        """What happens to a bad record: "error" (raise) or "skip" (count)."""
        if error.reason in OVERLONG_REASONS:
            return "error" if self.overlong == "error" else "skip"
        return self.on_bad_sample

    def _check_sample(self, messages: list[dict], sizes: list[tuple[int, int]]) -> int:
        """Raise SampleError, or return the sample's token length (what its encoding will have)."""
        return self.processor.check(messages, sizes, self.generation, self.max_length, self.overlong)

    def __len__(self) -> int:
        return len(self.rows)

    def sample(self, index: int) -> Sample:
        """The kept record `index`, read from the source again."""
        row = self.rows[index]
        try:
            return self._parse(row, self._record(row))[0]
        except SampleError as e:  # the file changed since validation: still say where
            raise e.at(self.source.location(row)) from e

    def _encode(self, sample: Sample) -> dict:
        try:
            images = [load_image(ref, self.exif_transpose, self.limits) for ref in sample.images]
            return self.processor.encode(sample.messages, images, self.generation, self.max_length, self.overlong)
        except SampleError as e:  # the file changed since validation: still say where
            raise e.at(sample.location) from e


class _ImageTable:
    """The image files rows name, once each: [path, size, mtime_ns] (None, None: missing at validation)."""

    def __init__(self, stamps: list):
        self.stamps = [list(s) for s in stamps]
        self._index = {s[0]: i for i, s in enumerate(self.stamps)}

    def add(self, stamp: list) -> int:
        i = self._index.get(stamp[0])
        if i is None:
            i = self._index[stamp[0]] = len(self.stamps)
            self.stamps.append(stamp)
        else:
            self.stamps[i] = stamp
        return i

    def changed(self) -> set[int]:
        """The indices of files whose stamp is not the recorded one any more."""
        return {i for i, s in enumerate(self.stamps) if (file_stamp(s[0]) or [s[0], None, None]) != s}


class SFTDataset(_ValidatedData):
    """Training samples: `dataset[i]` is `processor.encode(messages, images)` (labels on the answers)."""

    def __getitem__(self, index: int) -> dict:
        return self._encode(self.sample(index))


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

    def _policy(self, error: SampleError) -> str:
        # Over-long prompts cannot be truncated, so they follow on_bad_sample like any other bad record.
        return self.on_bad_sample

    def _check_sample(self, messages: list[dict], sizes: list[tuple[int, int]]) -> int:
        last = messages[-1] if isinstance(messages, list) and messages else None
        if not (isinstance(last, dict) and last.get("role") in ("assistant", "<|Assistant|>")):
            # Run the structural checks first so schema errors keep their own reason.
            self.processor.plan(messages, sizes, generation=True)
            msg = "an eval record must end with the reference assistant answer"
            raise SampleError("no_assistant_turn", msg)
        return super()._check_sample(messages, sizes)

    def answer(self, index: int) -> str:
        return reference_answer(self.sample(index))

    def __getitem__(self, index: int) -> tuple[dict, str]:
        sample = self.sample(index)  # (read once: the prompt and the reference come from the same record)
        return self._encode(sample), reference_answer(sample)


def reference_answer(sample: Sample) -> str:
    """An eval record's reference: its last (assistant) message, stripped."""
    return sample.messages[-1]["content"].strip()


def collate_eval(pairs: list[tuple[dict, str]], collator) -> tuple[dict, list[str]]:
    """Batch eval pairs with a (left-padding) Collator: (batch, reference answers)."""
    encodings, answers = zip(*pairs)
    return collator(list(encodings)), list(answers)
