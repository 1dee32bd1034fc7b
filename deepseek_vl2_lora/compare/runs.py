"""Reading runs for the comparison: run dirs, sweep dirs, eval.json files and W&B runs, into `RunData`."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
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


def benchmark_scores(metrics: dict | None) -> dict[str, float]:
    """{name: score} of the `eval/<name>/accuracy` keys (deepseek_vl2_lora/benchmarks), in logged order."""
    out = {}
    for key, value in (metrics or {}).items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "eval" and parts[2] == "accuracy" and _num(value) is not None:
            out[parts[1]] = _num(value)
    return out


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
