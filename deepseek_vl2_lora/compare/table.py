"""The comparison table: one row per run (and per untrained baseline), mean ± std over seeds, benchmark columns with
the difference to the baseline; markdown."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from .runs import BASELINE_LABEL, RunData, _num, benchmark_scores


@dataclass
class Row:
    label: str
    kind: str
    source: str
    policy: str | None
    trainable_params: int | None
    trainable_percent: float | None
    steps: int | None
    train_loss: float | None
    eval_loss: float | None
    eval_accuracy: float | None
    eval_samples: int | None
    tokens_per_s: float | None
    peak_mem_gb: float | None
    peak_mem_kind: str | None  # allocated (CUDA) | rss (CPU)
    wall_s: float | None
    group: str | None = None  # the label without the seed: runs that differ only in their seed share it
    benchmarks: dict[str, float] = field(default_factory=dict)  # benchmark name -> eval/<name>/accuracy


# ------------------------------------------------------------------------------------------------ the table
def train_loss(run: RunData, last: int) -> float | None:
    values = [v for v in (_num(r.get("train/loss")) for r in run.train) if v is not None][-last:]
    return sum(values) / len(values) if values else None


def tokens_per_s(run: RunData) -> float | None:
    tokens = sum(_num(r.get("train/tokens")) or 0.0 for r in run.train)
    seconds = sum(_num(r.get("perf/step_time_s")) or 0.0 for r in run.train)
    return tokens / seconds if seconds > 0 else None


def peak_memory(run: RunData) -> tuple[float | None, str | None]:
    for key, kind in (("mem/peak_allocated_gb", "allocated"), ("mem/peak_rss_gb", "rss")):
        values = [v for v in (_num(r.get(key)) for r in run.train) if v is not None]
        if values:
            return max(values), kind
    return None, None


def _eval_row(label, kind, source, metrics: dict | None, **kw) -> Row:
    metrics = metrics or {}
    samples = metrics.get("eval/samples")
    defaults = dict(policy=None, trainable_params=None, trainable_percent=None, steps=None, train_loss=None)
    defaults.update(tokens_per_s=None, peak_mem_gb=None, peak_mem_kind=None, wall_s=None)
    defaults.update(kw)
    return Row(
        label=label,
        kind=kind,
        source=source,
        eval_loss=_num(metrics.get("eval/loss")),
        eval_accuracy=_num(metrics.get("eval/accuracy")),
        eval_samples=int(samples) if samples is not None else None,
        benchmarks=benchmark_scores(metrics),
        **defaults,
    )


def _short(source: str) -> str:
    """A run dir's name for labels: <parent>/<name> when the name alone says little (a multirun job number)."""
    p = Path(source)
    if p.suffix == ".json":
        p = p.parent
    return f"{p.parent.name}/{p.name}" if p.name.isdigit() and p.parent.name else p.name


def _is_seed(override: str) -> bool:
    return override.split("=", 1)[0].lstrip("+") == "seed"


def _labels(runs: list[RunData]) -> list[tuple[str, str]]:
    """(label, group) per run. Label: the run's overrides that differ between the runs compared, else its policy,
    else its directory; group: the same without the seed."""
    common = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    labels = []
    for r in runs:
        own = [o for o in r.overrides if o not in common]
        fallback = r.policy or Path(r.source).name
        seedless = ", ".join(o for o in own if not _is_seed(o))
        labels.append((r.label or ", ".join(own) or fallback, seedless or r.policy or r.label or fallback))
    seen: dict[str, int] = {}
    for lab, _ in labels:
        seen[lab] = seen.get(lab, 0) + 1
    return [(f"{lab} ({_short(r.source)})" if seen[lab] > 1 else lab, group) for (lab, group), r in zip(labels, runs)]


def build_rows(runs: list[RunData], last: int = 10) -> list[Row]:
    """Baseline rows first (deduplicated), then one row per run / trained eval, in input order."""
    trained = [r for r in runs if r.kind != "baseline"]
    rows, baselines = [], []
    for r in runs:
        if r.kind == "baseline":
            baselines.append((r.label if r.label != BASELINE_LABEL else "", r.source, r.eval_final))
        else:
            for m in r.baselines:
                baselines.append(("", r.source + "/eval_baseline.json", m))
            if r.eval_before:
                baselines.append(("", r.source, r.eval_before))
    seen = set()
    unique = []
    for name, source, m in baselines:
        key = (round(m.get("eval/loss") or 0.0, 6), round(m.get("eval/accuracy") or 0.0, 6), m.get("eval/samples"))
        key += tuple(sorted((k, round(v, 6)) for k, v in benchmark_scores(m).items()))
        if key not in seen:
            seen.add(key)
            unique.append((name, source, m))
    for name, source, m in unique:
        label = BASELINE_LABEL
        if len(unique) > 1:
            label += f" ({name or _short(source)})"
        rows.append(_eval_row(label, "baseline", source, m, trainable_params=0, trainable_percent=0.0))
    for r, (label, group) in zip(trained, _labels(trained)):
        mem, mem_kind = peak_memory(r)
        rows.append(
            _eval_row(
                label,
                r.kind,
                r.source,
                r.eval_final,
                policy=r.policy,
                trainable_params=r.trainable_params,
                trainable_percent=r.trainable_percent,
                steps=r.steps,
                train_loss=train_loss(r, last),
                tokens_per_s=tokens_per_s(r),
                peak_mem_gb=mem,
                peak_mem_kind=mem_kind,
                wall_s=_num(r.seconds),
                group=group,
            )
        )
    return rows


def _mean_std(values: list[float | None], spec: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return format(mean, spec)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{format(mean, spec)} ± {format(std, spec)}"


def aggregate_table(rows: list[Row]) -> str | None:
    """Mean ± sample std over the runs that differ only in their seed; None when no two runs do."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        if row.kind == "run":
            groups.setdefault(row.group or row.label, []).append(row)
    if not any(len(g) > 1 for g in groups.values()):
        return None
    names, base = benchmark_columns(rows)
    header = ["runs (mean ± std over seeds)", "policy", "n", "train loss", "eval loss", "eval acc", *names, "tokens/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for group, members in groups.items():
        cells = [
            group,
            ", ".join(sorted({m.policy or "–" for m in members})),
            str(len(members)),
            _mean_std([m.train_loss for m in members], ".4f"),
            _mean_std([m.eval_loss for m in members], ".4f"),
            _mean_std([m.eval_accuracy for m in members], ".3f"),
            *[_with_delta(_mean_std([m.benchmarks.get(n) for m in members], ".3f"), members, n, base) for n in names],
            _mean_std([m.tokens_per_s for m in members], ",.0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def benchmark_columns(rows: list[Row]) -> tuple[list[str], dict[str, float]]:
    """(benchmark names in first-seen order, the first baseline row's score of each)."""
    names: list[str] = []
    baseline: dict[str, float] = {}
    for row in rows:
        for name, value in row.benchmarks.items():
            if name not in names:
                names.append(name)
            if row.kind == "baseline":
                baseline.setdefault(name, value)
    return names, baseline


def _with_delta(cell: str, members: list[Row], name: str, baseline: dict[str, float]) -> str:
    """The cell with the mean difference to the untrained baseline, e.g. `0.812 (+0.312)`."""
    values = [m.benchmarks[name] for m in members if name in m.benchmarks]
    if not values or name not in baseline or all(m.kind == "baseline" for m in members):
        return cell
    return f"{cell} ({sum(values) / len(values) - baseline[name]:+.3f})"


def _fmt(v, spec: str, dash: str = "–") -> str:
    return dash if v is None else format(v, spec)


def format_row(row: Row, names: list[str] = (), baseline: dict[str, float] | None = None) -> list[str]:
    params = _fmt(row.trainable_params, ",")
    if row.trainable_params and row.trainable_percent is not None:
        params += f" ({row.trainable_percent:.2f}%)"
    mem = _fmt(row.peak_mem_gb, ".2f")
    if row.peak_mem_kind == "rss":
        mem += " (RSS)"
    return [
        row.label,
        row.policy or "–",
        params,
        _fmt(row.steps, "d"),
        _fmt(row.train_loss, ".4f"),
        _fmt(row.eval_loss, ".4f"),
        _fmt(row.eval_accuracy, ".3f"),
        *[_with_delta(_fmt(row.benchmarks.get(n), ".3f"), [row], n, baseline or {}) for n in names],
        _fmt(row.tokens_per_s, ",.0f"),
        mem,
        _fmt(row.wall_s, ".1f"),
    ]


def markdown_table(rows: list[Row], last: int = 10) -> str:
    names, baseline = benchmark_columns(rows)
    header = [
        "run",
        "policy",
        "trainable params",
        "steps",
        f"train loss (last {last})",
        "eval loss",
        "eval acc",
        *names,
        "tokens/s",
        "peak mem GB",
        "wall s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(format_row(r, names, baseline)) + " |" for r in rows]
    return "\n".join(lines) + "\n"
