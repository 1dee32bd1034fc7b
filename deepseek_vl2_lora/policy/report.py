"""The policy report: per group its mode, modules, parameters and trainable parameters, and the exact trainable
names (`trainable_parameters.json` in a run dir; the table at the start of a run)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class GroupReport:
    group: str
    mode: str
    modules: int = 0
    params: int = 0
    trainable: int = 0
    note: str = ""


@dataclass
class PolicyReport:
    policy: str
    groups: list[GroupReport]
    trainable_names: list[str]
    total_params: int
    trainable_params: int
    warnings: list[str] = field(default_factory=list)
    lora: dict | None = None

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable_params / max(self.total_params, 1)

    def table(self) -> str:
        rows = [("group", "mode", "modules", "params", "trainable", "note")]
        for g in self.groups:
            rows.append((g.group, g.mode, str(g.modules), f"{g.params:,}", f"{g.trainable:,}", g.note))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [
            "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + "  " + r[5]
            for r in rows
        ]
        lines.insert(1, "-" * len(lines[0]))
        lines.append(
            f"policy {self.policy}: trainable {self.trainable_params:,} / {self.total_params:,} ({self.percent:.4f}%)"
        )
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["percent"] = self.percent
        return d

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
