"""`DataReport`: what validating one data source found (kept records, skipped ones by reason, the layout), and
every skipped line (`skipped_lines`, written by the trainer to ``data_skipped.jsonl``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .processor import SampleError


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
    # A mixture source's sampling (records used, weight, draws per epoch, share; `Mixture.describe`); None: not one
    sampling: dict | None = None
    # Token-budget batching (the train split): the budget and each epoch's packing efficiency (`budget`); None: off
    packing: dict | None = None
    skipped_lines: list[dict] = field(default_factory=list)  # every skipped record: location, reason, message
    train_lines: list[dict] = field(default_factory=list)  # every sample skipped at train time (this process)

    max_examples = 3

    def skip(self, error: SampleError) -> None:
        self.skipped[error.reason] += 1
        self.skipped_lines.append({"location": error.location, "reason": error.reason, "message": error.message})
        shown = self.examples.setdefault(error.reason, [])
        if len(shown) < self.max_examples:
            shown.append(str(error))

    def skip_at_train(self, line: str, reason: str) -> None:
        """A sample that failed to load while training (`line`: ``file:line: message [reason]``)."""
        self.skipped_at_train[reason] += 1
        self.train_lines.append({"reason": reason, "line": line})

    def skipped_records(self, split: str | None = None) -> list[dict]:
        """Every skipped line as a JSON-able dict (stage "validation" or "train"), for ``data_skipped.jsonl``."""
        head = {"split": split} if split is not None else {}
        lines = [{**head, "source": self.source, "stage": "validation", **x} for x in self.skipped_lines]
        return lines + [{**head, "source": self.source, "stage": "train", **x} for x in self.train_lines]

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
            **({"sampling": dict(self.sampling)} if self.sampling is not None else {}),
            **({"packing": dict(self.packing)} if self.packing is not None else {}),
        }

    def summary(self) -> str:
        """One line: source, layout, records kept, placeholders added (and skipped records, if any)."""
        parts = [f"{self.kept} records"]
        if self.placeholders_added:
            parts.append(f"{self.placeholders_added} placeholders added")
        if self.num_skipped:
            parts.append(f"{self.num_skipped} skipped")
        line = f"{self.source}: layout {self.layout or 'none'} ({', '.join(parts)})"
        if self.sampling is not None:
            s = self.sampling
            used = f"using the first {s['records']}, " if s["records"] < self.kept else ""
            line += f", {used}weight {s['weight']:g}, {s['draws_per_epoch']} draws per epoch ({s['share']:.1%})"
        return line

    def __str__(self) -> str:
        lines = [f"{self.source}: {self.total} records, {self.kept} kept, {self.num_skipped} skipped"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  {reason}: {count}")
            lines += [f"    e.g. {msg}" for msg in self.examples.get(reason, [])]
        return "\n".join(lines)
