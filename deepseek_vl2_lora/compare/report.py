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
import sys
from dataclasses import asdict
from pathlib import Path

from .plot import plot
from .runs import CompareError, RunData, load_paths, load_wandb
from .table import aggregate_table, build_rows, markdown_table


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
