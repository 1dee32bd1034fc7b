"""Compare runs (e.g. freezing policies): a markdown table and a PNG of loss and accuracy curves.

    python scripts/compare.py multirun/policies                    # a sweep dir: every run under it
    python scripts/compare.py outputs/default/A outputs/default/B outputs/baseline --out reports/ab
    python scripts/compare.py --wandb ENTITY/PROJECT --wandb-group default-policies     # from W&B (online)

Inputs (any mix): a run dir (summary.json, metrics.jsonl, trainable_parameters.json, .hydra/overrides.yaml); a
sweep dir or any directory holding run dirs (expanded to them, in natural order); a directory with an eval.json
or an eval.json itself (`python -m deepseek_vl2_lora.eval`: a baseline or a trained state); W&B runs with
`--wandb ENTITY/PROJECT`, read with the public API (needs network and `wandb login`; only when asked).

One row per run, plus "untrained baseline" rows: a run's eval before training (summary.json `eval_before`, else
its first eval record), its `eval_baseline.json`, or a baseline eval.json given as input; identical baselines
(same loss, accuracy and sample count) are shown once.

Columns, all read from the run's files:
    trainable params  trainable_parameters.json `trainable_params` (and `percent`)
    train loss        mean `train/loss` over the last --last train records of metrics.jsonl (default 10)
    eval loss / acc   the run's final eval: summary.json `eval_after` (else the last eval record, else the run's
                      eval.json)
    <benchmark>       one column per benchmark (`eval/<name>/accuracy`, trainer.eval_benchmarks or eval --benchmark),
                      with the difference to the untrained baseline in parentheses
    tokens/s          sum of `train/tokens` / sum of `perf/step_time_s` over all train records
    peak mem GB       max `mem/peak_allocated_gb` (CUDA) or `mem/peak_rss_gb` (CPU: process peak RSS, which for
                      Hydra multirun jobs sharing one process is the peak so far)
    wall s            summary.json `seconds` (setup, evals and saving included)

Written to --out (default: <the one input dir>/compare, else outputs/compare): compare.md (the table),
compare.json (the rows' raw values), loss_curves.png.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..training.sweep import relevant_overrides

BASELINE_LABEL = "untrained baseline"
RUN_MARKERS = ("summary.json", "metrics.jsonl", "config_resolved.yaml")
SKIP_DIRS = {"wandb", "checkpoints", "trained", "eval", ".hydra", "compare", "__pycache__"}
MAX_DEPTH = 4


class CompareError(ValueError):
    pass


@dataclass
class RunData:
    """Everything the table and the plot need from one run (local or W&B)."""

    source: str
    label: str = ""
    kind: str = "run"  # run | eval (an eval.json of a trained state) | baseline
    policy: str | None = None
    trainable_params: int | None = None
    trainable_percent: float | None = None
    steps: int | None = None
    seconds: float | None = None
    overrides: list[str] = field(default_factory=list)
    train: list[dict] = field(default_factory=list)  # train records: step, train/loss, train/tokens, perf/..., mem/...
    evals: list[dict] = field(default_factory=list)  # eval records: step, eval/loss, eval/accuracy, ...
    eval_before: dict | None = None
    eval_final: dict | None = None
    baselines: list[dict] = field(default_factory=list)  # eval_baseline.json metrics found with the run
    wandb_id: str | None = None


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


# ------------------------------------------------------------------------------------------------ reading
def _num(v) -> float | None:
    """A finite number, or None (metrics.jsonl writes non-finite floats as strings)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _natural(p: Path):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def is_run_dir(d: Path) -> bool:
    return any((d / m).is_file() for m in RUN_MARKERS)


def expand(path: str | Path) -> list[Path]:
    """Run dirs and eval.json files under `path` (a run dir, an eval dir/file, or a directory holding them)."""
    p = Path(path)
    if p.is_file():
        if p.suffix == ".json":
            return [p]
        raise CompareError(f"{p}: expected a run dir, a sweep dir or an eval.json")
    if not p.is_dir():
        raise CompareError(f"{p}: no such directory")

    found: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        if is_run_dir(d):
            found.append(d)
            return
        if (d / "eval.json").is_file():
            found.append(d / "eval.json")
            return
        if depth >= MAX_DEPTH:
            return
        for child in sorted((c for c in d.iterdir() if c.is_dir() and c.name not in SKIP_DIRS), key=_natural):
            walk(child, depth + 1)

    walk(p, 0)
    if not found:
        raise CompareError(f"{p}: no run dirs ({', '.join(RUN_MARKERS)}) or eval.json under it")
    return found


def _hydra_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def load_run(run_dir: str | Path) -> RunData:
    """A local run dir's files as RunData (missing files leave their fields empty)."""
    from ..training.metrics import read_metrics

    run_dir = Path(run_dir)
    run = RunData(source=str(run_dir), overrides=relevant_overrides(_hydra_overrides(run_dir)))
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    run.train = [r for r in records if r.get("kind") == "train"]
    run.evals = [r for r in records if r.get("kind") == "eval"]
    params = _read_json(run_dir / "trainable_parameters.json") or {}
    run.policy = params.get("policy")
    run.trainable_params = params.get("trainable_params")
    run.trainable_percent = params.get("percent")
    summary = _read_json(run_dir / "summary.json") or {}
    run.steps = summary.get("steps", run.train[-1]["step"] if run.train else None)
    run.seconds = summary.get("seconds")
    run.eval_before = summary.get("eval_before")
    if run.eval_before is None:
        before = [r for r in run.evals if r.get("eval/tag") == "before"]
        run.eval_before = before[0] if before else None
    run.eval_final = summary.get("eval_after")
    if run.eval_final is None:
        after = [r for r in run.evals if r.get("eval/tag") != "before"]
        run.eval_final = after[-1] if after else None
    if run.eval_final is None and (run_dir / "eval.json").is_file():
        run.eval_final = _read_json(run_dir / "eval.json")["metrics"]
    if run.policy is None:
        cfg = run_dir / "config_resolved.yaml"
        if cfg.is_file():
            from omegaconf import OmegaConf

            run.policy = OmegaConf.select(OmegaConf.load(cfg), "policy.name")
    baseline = _read_json(run_dir / "eval_baseline.json")
    if baseline:
        run.baselines.append(baseline["metrics"])
    meta = _read_json(run_dir / "wandb_run.json")
    run.wandb_id = meta.get("id") if meta else None
    return run


def load_eval_json(path: str | Path) -> RunData:
    """An eval.json written by `python -m deepseek_vl2_lora.eval`."""
    path = Path(path)
    out = json.loads(path.read_text())
    if "metrics" not in out:
        raise CompareError(f"{path}: not an eval.json (no 'metrics')")
    kind = "baseline" if out.get("kind") == "baseline" else "eval"
    return RunData(
        source=str(path),
        label=out.get("label") or path.parent.name,
        kind=kind,
        policy=out.get("policy"),
        trainable_params=out.get("trainable_params"),
        eval_final=out["metrics"],
    )


def load_paths(paths: list[str | Path]) -> list[RunData]:
    runs = []
    for p in paths:
        for item in expand(p):
            runs.append(load_eval_json(item) if item.is_file() else load_run(item))
    return runs


# ------------------------------------------------------------------------------------------------ W&B
def load_wandb(path: str, group=None, tags=(), run_ids=(), api=None) -> list[RunData]:
    """Runs of W&B project `path` (ENTITY/PROJECT) via the public API, optionally filtered by group/tags/ids."""
    if api is None:
        import wandb

        api = wandb.Api()
    filters = {}
    if group:
        filters["group"] = group
    if tags:
        filters["tags"] = {"$all": list(tags)}
    if run_ids:
        filters["name"] = {"$in": list(run_ids)}  # the API's `name` is the run id
    runs = []
    for r in api.runs(path, filters=filters or None):
        data = RunData(source=f"wandb:{path}/{r.id}", label=r.name, wandb_id=r.id)
        config = dict(r.config or {})
        data.policy = (config.get("policy") or {}).get("name")
        data.overrides = relevant_overrides((config.get("sweep") or {}).get("overrides") or [])
        summary = dict(r.summary or {})
        data.trainable_params = summary.get("params/trainable")
        total = summary.get("params/total")
        if data.trainable_params is not None and total:
            data.trainable_percent = 100.0 * data.trainable_params / total
        data.seconds = summary.get("_runtime")
        for row in r.scan_history():
            step = row.get("_step")
            if row.get("train/loss") is not None:
                data.train.append({"step": step, **{k: v for k, v in row.items() if k.split("/")[0] in _TRAIN}})
            if row.get("eval/accuracy") is not None or row.get("eval/loss") is not None or benchmark_scores(row):
                data.evals.append({"step": step, **{k: v for k, v in row.items() if k.startswith("eval/")}})
        data.train.sort(key=lambda x: x["step"])
        data.evals.sort(key=lambda x: x["step"])
        data.steps = data.train[-1]["step"] if data.train else None
        if data.evals and data.evals[0]["step"] == 0:
            data.eval_before = data.evals[0]
        later = [e for e in data.evals if e["step"] > 0]
        data.eval_final = later[-1] if later else {k: v for k, v in summary.items() if k.startswith("eval/")} or None
        runs.append(data)
    return runs


_TRAIN = ("train", "perf", "mem")


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


def benchmark_scores(metrics: dict | None) -> dict[str, float]:
    """{name: score} of the `eval/<name>/accuracy` keys (deepseek_vl2_lora/benchmarks), in logged order."""
    out = {}
    for key, value in (metrics or {}).items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "eval" and parts[2] == "accuracy" and _num(value) is not None:
            out[parts[1]] = _num(value)
    return out


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


# ------------------------------------------------------------------------------------------------ the plot
def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot(runs: list[RunData], rows: list[Row], path: str | Path, smooth: int = 0) -> Path:
    """loss_curves.png: train loss (moving average), eval loss and eval accuracy against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in runs if r.kind == "run"]
    run_rows = {row.source: row for row in rows if row.kind == "run"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    ax_train, ax_loss, ax_acc = axes
    colors: dict[str, str] = {}
    styles = ["-", "--", ":", "-."]
    used: dict[str, int] = {}
    for r in trained:
        row = run_rows.get(r.source)
        label = row.label if row else Path(r.source).name
        group = (row.group if row else None) or label
        color = colors.setdefault(group, f"C{len(colors) % 10}")
        style = styles[used.get(group, 0) % len(styles)]
        used[group] = used.get(group, 0) + 1
        pts = [(rec["step"], _num(rec.get("train/loss"))) for rec in r.train]
        pts = [(s, v) for s, v in pts if v is not None]
        if pts:
            steps, values = zip(*pts)
            window = smooth or max(1, len(values) // 40)
            ax_train.plot(steps, values, color=color, alpha=0.12, linewidth=0.8)
            ax_train.plot(steps, _smooth(list(values), window), color=color, linestyle=style, label=label)
        for ax, key in ((ax_loss, "eval/loss"), (ax_acc, "eval/accuracy")):
            pts = [(rec["step"], _num(rec.get(key))) for rec in r.evals]
            pts = [(s, v) for s, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, color=color, linestyle=style, label=label)
    for j, row in enumerate(row for row in rows if row.kind == "baseline"):
        for ax, v in ((ax_loss, row.eval_loss), (ax_acc, row.eval_accuracy)):
            if v is not None:
                ax.axhline(v, color="gray", linestyle=(0, (4, 2 + 2 * j)), linewidth=1, label=row.label)
    ax_train.set(title="train loss (moving average)", xlabel="step", ylabel="LM loss")
    ax_loss.set(title="eval loss", xlabel="step", ylabel="LM loss")
    ax_acc.set(title="eval exact-match accuracy", xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02))
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, names = ax_acc.get_legend_handles_labels()
    if not handles:
        handles, names = ax_train.get_legend_handles_labels()
    if handles:  # one legend for the three panels, below them
        ncol = min(4, len(handles))
        fig.legend(handles, names, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.04 + 0.035 * math.ceil(len(handles) / ncol), 1, 1))
    else:
        fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ CLI
def write_report(runs: list[RunData], out_dir: str | Path, last: int = 10, smooth: int = 0) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = build_rows(runs, last)
    table = markdown_table(rows, last)
    aggregate = aggregate_table(rows)
    try:
        png = plot(runs, rows, out_dir / "loss_curves.png", smooth)
    except ImportError as e:  # matplotlib is in the [dev] extra
        print(f"warning: no plot ({e}); pip install matplotlib", file=sys.stderr)
        png = None
    notes = [
        f"train loss: mean of the last {last} logged steps; eval: the run's final eval (eval before training for "
        "the baseline); tokens/s: all train tokens / all step time; peak mem: CUDA peak allocated, or (RSS) the "
        "process's peak resident memory on CPU; wall: the run's total seconds.",
    ]
    parts = [table, *notes, ""]
    if aggregate:
        parts += [aggregate]
    md = "\n".join([*parts, *([f"![loss curves]({png.name})", ""] if png else [])])
    (out_dir / "compare.md").write_text(md)
    (out_dir / "compare.json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return {"table": table, "aggregate": aggregate, "rows": rows, "markdown": out_dir / "compare.md", "png": png}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="scripts/compare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("paths", nargs="*", help="run dirs, sweep dirs, eval dirs or eval.json files")
    ap.add_argument("--out", help="output directory (default: <the one input dir>/compare, else outputs/compare)")
    ap.add_argument("--last", type=int, default=10, help="train loss = mean over the last N logged steps")
    ap.add_argument("--smooth", type=int, default=0, help="moving-average window of the train-loss curves")
    ap.add_argument("--wandb", metavar="ENTITY/PROJECT", help="also read runs from W&B (public API, online)")
    ap.add_argument("--wandb-group", help="only W&B runs of this group")
    ap.add_argument("--wandb-tag", action="append", default=[], help="only W&B runs with this tag (repeatable)")
    ap.add_argument("--wandb-run", action="append", default=[], help="only these W&B run ids (repeatable)")
    args = ap.parse_args(argv)
    if not args.paths and not args.wandb:
        ap.error("give run/sweep dirs, or --wandb ENTITY/PROJECT")
    try:
        runs = load_paths(args.paths)
        if args.wandb:
            local_ids = {r.wandb_id for r in runs if r.wandb_id}
            remote = load_wandb(args.wandb, args.wandb_group, args.wandb_tag, args.wandb_run)
            runs += [r for r in remote if r.wandb_id not in local_ids]
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not runs:
        print("error: no runs found", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
    elif len(args.paths) == 1 and Path(args.paths[0]).is_dir():
        out = Path(args.paths[0]) / "compare"
    else:
        out = Path("outputs") / "compare"
    report = write_report(runs, out, args.last, args.smooth)
    print(report["table"])
    if report["aggregate"]:
        print(report["aggregate"])
    print(f"wrote {report['markdown']}, {out / 'compare.json'}" + (f" and {report['png']}" if report["png"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
