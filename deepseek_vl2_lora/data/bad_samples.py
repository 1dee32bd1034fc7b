"""Bad samples at train time: a sample that validated at start but fails to load later (an image deleted or
unreadable mid-run) is replaced by the next one and counted (``skip``), or is one error line (``error``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .processor import SampleError
from .report import DataReport

ON_BAD_SAMPLE = ("error", "skip")
log = logging.getLogger(__name__)


@dataclass
class TrainItem:
    """A training sample as the loader passes it on: its encoding (None: it failed under ``error``), the
    bad samples it replaced (one line each, ``file:line: message [reason]``) and their reasons."""

    encoding: dict | None
    skipped: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    sources: list[str | None] = field(default_factory=list)  # a mixture's source of each skipped sample
    row: int | None = None  # token-budget batching: the packed row of its micro batch the sample belongs to


class SkipBadSamples(torch.utils.data.Dataset):
    """A training set whose samples may go bad after validation (an image deleted or unreadable mid-run).

    ``items[i]`` encodes ``dataset[i]``. When that raises a SampleError (or the image fails to open), under
    ``on_bad_sample="skip"`` the next index ``i+1, i+2, ...`` (mod the set size) is encoded instead and the bad
    one is reported with it, so the batch stays full and the substitution depends on the files only (a resumed
    run makes the same one). A key ``(row, index)`` (token-budget batching, `budget.BudgetBatchSampler`) names the
    packed row the sample goes into: a bad one is not replaced there (another sample would not fit the row's
    budget) but left out of its row (``encoding=None``, counted the same way). Under ``"error"`` the failure comes
    back as the item (``encoding=None``) and `collate_items` / `unwrap_batch` raise it in the main process as one
    SampleError line naming ``file:line``: an exception raised in a DataLoader worker would otherwise arrive
    wrapped in its worker's traceback.
    """

    def __init__(self, dataset, on_bad_sample: str = "error"):
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"on_bad_sample must be one of {ON_BAD_SAMPLE}, got {on_bad_sample!r}")
        self.dataset, self.on_bad_sample = dataset, on_bad_sample

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def epoch_order(self):
        """The wrapped set's own order (a `Mixture`'s), or None: the sampler's default."""
        return getattr(self.dataset, "epoch_order", None)

    def source_name(self, index: int) -> str | None:
        """The mixture source of `index`; None for a single source."""
        name = getattr(self.dataset, "source_name", None)
        return name(index) if name is not None else None

    def __getitem__(self, key) -> TrainItem:
        row, index = key if isinstance(key, tuple) else (None, key)
        item = TrainItem(None, row=row)
        for k in range(len(self.dataset) if row is None else 1):
            try:
                item.encoding = self.dataset[(index + k) % len(self.dataset)]
                return item
            except (SampleError, OSError) as e:
                error = e if isinstance(e, SampleError) else SampleError("corrupt_image", f"{type(e).__name__}: {e}")
                item.skipped.append(str(error))
                item.reasons.append(error.reason)
                item.sources.append(self.source_name((index + k) % len(self.dataset)))
                if self.on_bad_sample == "error":
                    return item
        return item  # every sample failed (or, in a packed row, this one): CollateItems decides


class CollateItems:
    """Collate TrainItems with `collator`: (batch or None, the items' skipped lines and reasons, the error line
    or None, the skipped samples' mixture sources). Items with a `row` are packed into exactly those rows
    (`Collator.collate_rows`), a sample left out of its row under ``skip`` dropped. Picklable, for DataLoader
    workers."""

    def __init__(self, collator, on_bad_sample: str = "error"):
        self.collator, self.on_bad_sample = collator, on_bad_sample

    def __call__(self, items: list[TrainItem]) -> tuple[dict | None, list[str], list[str], str | None, list]:
        skipped = [line for it in items for line in it.skipped]
        reasons = [r for it in items for r in it.reasons]
        sources = [s for it in items for s in it.sources]
        failed = [it for it in items if it.encoding is None]
        rows = items[0].row is not None
        if failed and (self.on_bad_sample == "error" or not rows or len(failed) == len(items)):
            why = failed[0].skipped[-1] if self.on_bad_sample == "error" else "every training sample failed to load"
            return None, skipped, reasons, why, sources
        if not rows:
            return self.collator([it.encoding for it in items]), skipped, reasons, None, sources
        packed: dict[int, list[dict]] = {}
        for it in items:
            if it.encoding is not None:
                packed.setdefault(it.row, []).append(it.encoding)
        return self.collator.collate_rows(list(packed.values())), skipped, reasons, None, sources


def unwrap_batch(collated, report: DataReport | None = None, source_reports: dict | None = None) -> dict:
    """The batch from `CollateItems`, its skipped samples counted into ``report.skipped_at_train`` (and logged),
    and into their mixture source's report (``source_reports[name]``); a failed sample raised here as one
    SampleError line (reason ``at_train``)."""
    batch, skipped, reasons, error, sources = collated
    if error is not None:
        raise SampleError("at_train", f"while training: {error}")
    for line, reason, source in zip(skipped, reasons, sources):
        log.warning("skipped a bad training sample (data.on_bad_sample=skip): %s", line)
        if report is not None:
            report.skip_at_train(line, reason)
        if source is not None and source_reports and source in source_reports:
            source_reports[source].skipped_at_train[reason] += 1
    return batch
