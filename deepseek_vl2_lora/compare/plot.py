"""The loss and accuracy curves of the compared runs, as one PNG (matplotlib, from the [dev] extra)."""

from __future__ import annotations

import math
from pathlib import Path

from .runs import RunData, _num
from .table import Row


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
