"""Evaluate a run, a trained state or a bare checkpoint: eval loss and exact-match accuracy, written to eval.json.

    python -m deepseek_vl2_lora.eval RUN_DIR                   # its trained model -> RUN_DIR/eval.json
    python -m deepseek_vl2_lora.eval RUN_DIR --baseline        # its base model -> RUN_DIR/eval_baseline.json
    python -m deepseek_vl2_lora.eval RUN_DIR/trained           # a trained-state dir (base model from its run, or
                                                               # the local base it records) or a PEFT adapter
    python -m deepseek_vl2_lora.eval RUN_DIR/checkpoints/step_00000400   # a step checkpoint (-> eval_step_*.json)
    python -m deepseek_vl2_lora.eval CHECKPOINT_DIR --out DIR/eval.json   # a bare checkpoint: the baseline
    python -m deepseek_vl2_lora.eval --out outputs/baseline/eval.json     # the default (demo) base model
    python -m deepseek_vl2_lora.eval RUN_DIR data.eval_path=other.jsonl data.eval_limit=null   # overrides
    python -m deepseek_vl2_lora.eval RUN_DIR --benchmark MMBench_DEV_EN.tsv --benchmark TextVQA_VAL.tsv --limit 200

(`vl2-eval` is the same command.)

With --benchmark (VLMEvalKit TSV files or their Hub parquet copies; deepseek_vl2_lora/benchmarks) the model is
scored on those instead of the eval split: eval.json holds `eval/<benchmark>/accuracy` (and per category) and
eval/<benchmark>.jsonl beside it the per-question predictions. An untrained baseline is read from the baseline
cache when a training run (or an earlier call) has computed it with the same settings.

What is evaluated and how (eval split, image root, eval_limit, eval_batch_size, eval_max_new_tokens, precision,
device, CPU threads) comes from the run's `config_resolved.yaml`; for a bare checkpoint or a trained state outside
a run dir, from the default config (`deepseek_vl2_lora/configs/train.yaml`, which `key=value` overrides compose
into, e.g. `experiment=smoke`). The metrics are `evaluate()`'s (deepseek_vl2_lora/evaluation/eval_set.py), exactly
those the training loop logs: evaluating a run dir reproduces its final eval. The predictions go next to eval.json
(`<name>.predictions.jsonl`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

from . import CONFIG_DIR

RUN_CONFIG = "config_resolved.yaml"
BASELINE_LABEL = "untrained baseline"


class EvalError(ValueError):
    """The path or the config cannot be evaluated; the message says why."""


def default_config(overrides: list[str] = ()):
    """`deepseek_vl2_lora/configs/train.yaml` composed with Hydra-style overrides (what `python train.py <overrides>`
    would run)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from .training.config import as_train_config

    if GlobalHydra.instance().is_initialized():  # e.g. called from inside a Hydra app
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return as_train_config(compose("train", overrides=list(overrides)))


def run_config(run_dir: Path, overrides: list[str] = ()):
    """A run's config_resolved.yaml, with key=value overrides merged in."""
    from omegaconf import OmegaConf

    from .training.config import as_train_config

    cfg = as_train_config(OmegaConf.load(run_dir / RUN_CONFIG))
    if overrides:
        bad = [o for o in overrides if "=" not in o or o.startswith(("+", "~"))]
        if bad:
            raise EvalError(f"overrides of a run's config must be key=value: {bad}")
        cfg = as_train_config(OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides))))
    return cfg


def resolve_target(path: str | None, baseline: bool, overrides: list[str], scratch: str | Path | None = None):
    """(kind, config, trained dir or None, default output path) for what `path` is. A step checkpoint is exported
    (a trained dir) into `scratch` first."""
    from omegaconf import OmegaConf

    from .policy.adapters import is_trained_dir

    if path is None:
        return "baseline", default_config(overrides), None, None
    p = Path(path).expanduser()
    if (p / RUN_CONFIG).is_file():  # a run dir
        cfg = run_config(p, overrides)
        if baseline:
            return "baseline", cfg, None, p / "eval_baseline.json"
        if not is_trained_dir(p / "trained"):
            raise EvalError(
                f"{p}: run dir without a trained state (trained/); use --baseline for its base, or evaluate one of "
                "its checkpoints (RUN_DIR/checkpoints/step_XXXXXXXX)"
            )
        return "trained", cfg, p / "trained", p / "eval.json"
    from .training.train_state import is_step_checkpoint

    if is_step_checkpoint(p):  # a step checkpoint of a run
        run = p.parent.parent
        if not (run / RUN_CONFIG).is_file():
            raise EvalError(f"{p}: a step checkpoint outside its run dir (no {run / RUN_CONFIG})")
        cfg = run_config(run, overrides)
        if baseline:
            return "baseline", cfg, None, run / "eval_baseline.json"
        if scratch is None:
            raise EvalError(f"{p}: a step checkpoint; export it first (vl2-export {p} OUT) and evaluate OUT")
        from .training.export import export_checkpoint

        return "trained", cfg, export_checkpoint(p, Path(scratch) / p.name), run / f"eval_{p.name}.json"
    if is_trained_dir(p):  # a trained-state dir or a stock PEFT adapter
        run = p.parent if (p.parent / RUN_CONFIG).is_file() else None
        cfg = run_config(run, overrides) if run else default_config(overrides)
        if run is None and not any(o.startswith("model.path=") for o in overrides):  # the base it records
            from .policy.adapters import trained_base

            base, name = trained_base(p)
            if base is None:
                raise EvalError(
                    f"{p}: its base checkpoint ({name!r}) is not a local directory here; pass model.path=<the base "
                    "checkpoint dir>"
                )
            OmegaConf.update(cfg, "model.path", str(base))
        where = run or p
        if baseline:
            return "baseline", cfg, None, where / "eval_baseline.json"
        return "trained", cfg, p, where / "eval.json"
    if (p / "config.json").is_file():  # a bare checkpoint: the untrained baseline
        cfg = default_config(overrides)
        OmegaConf.update(cfg, "model.path", str(p))
        return "baseline", cfg, None, None
    raise EvalError(
        f"{p}: not a run dir ({RUN_CONFIG}), a step checkpoint, a trained-state dir (policy.json or "
        "adapter_config.json) or a checkpoint dir (config.json)"
    )


def eval_datasets(cfg, processor):
    """(eval file, loss set, generation set) of cfg.data.eval_path, built as the training run builds them."""
    from .training.preflight import eval_datasets as build
    from .training.preflight import resolve_data_file

    if not cfg.data.eval_path:
        raise EvalError("data.eval_path is null: nothing to evaluate (pass data.eval_path=<file.jsonl>)")
    return resolve_data_file(cfg.data.eval_path, "data.eval_path"), *build(cfg.data, processor)


@contextmanager
def _loaded(cfg, trained_dir, device):
    """cfg's model (+ the trained state in `trained_dir`) in eval mode, with its processor and run settings."""
    import torch

    from .data.processor import DeepseekVL2Processor
    from .model.config import VL2Config
    from .policy.adapters import load_trained_state, trained_policy
    from .training.config import check_config
    from .training.dist_env import DistEnv, resolve_device
    from .training.preflight import resolve_model_dir
    from .training.run import load_model
    from .training.step import autocast_for, resolve_precision

    check_config(cfg)
    dev = resolve_device(device or cfg.trainer.device, DistEnv.from_env())
    threads = torch.get_num_threads()
    if dev.type == "cpu" and cfg.trainer.cpu_threads:
        torch.set_num_threads(cfg.trainer.cpu_threads)
    try:
        precision = resolve_precision(cfg.trainer.precision, dev)
        # A quantized base (model.quantize) keeps what the trained state's policy trains in full unquantized.
        config = VL2Config.from_file(resolve_model_dir(cfg.model) / "config.json")
        policy = trained_policy(trained_dir, config) if trained_dir is not None else cfg.policy
        model, model_dir = load_model(cfg.model, precision, dev, policy)
        report = None
        if trained_dir is not None:
            # Trainable weights in fp32, as the training loop keeps them (its final eval ran on those).
            report = load_trained_state(model, trained_dir, trainable_dtype=torch.float32)
            model.to(dev)
        model.eval()
        processor = DeepseekVL2Processor.from_pretrained(model_dir)
        yield SimpleNamespace(
            model=model,
            processor=processor,
            device=dev,
            precision=precision,
            autocast=autocast_for(precision, dev),
            model_dir=model_dir,
            header={
                "kind": "trained" if trained_dir is not None else "baseline",
                "label": report.policy if report is not None else BASELINE_LABEL,
                "policy": report.policy if report is not None else None,
                "trainable_params": report.trainable_params if report is not None else 0,
                "model_dir": str(model_dir),
                "trained_dir": str(trained_dir) if trained_dir is not None else None,
            },
        )
    finally:
        torch.set_num_threads(threads)


def evaluate_config(cfg, trained_dir: str | Path | None = None, device: str | None = None) -> dict:
    """Load cfg's model (+ the trained state in `trained_dir`), evaluate it on cfg's eval split: eval.json's content
    (plus "predictions")."""
    from .evaluation.eval_set import evaluate

    t0 = time.perf_counter()
    with _loaded(cfg, trained_dir, device) as m:
        eval_file, loss_set, gen_set = eval_datasets(cfg, m.processor)
        result = evaluate(
            m.model,
            m.processor,
            loss_set,
            gen_set,
            m.device,
            batch_size=cfg.trainer.eval_batch_size,
            max_new_tokens=cfg.trainer.eval_max_new_tokens,
            limit=cfg.data.eval_limit,
            autocast=m.autocast,
            on_bad_sample=cfg.data.on_bad_sample,
        )
    return {
        **m.header,
        "eval_path": str(Path(eval_file).resolve()),
        "eval_limit": cfg.data.eval_limit,
        "batch_size": cfg.trainer.eval_batch_size,
        "max_new_tokens": cfg.trainer.eval_max_new_tokens,
        "device": str(m.device),
        "precision": m.precision,
        "metrics": result.metrics(),
        "loss_tokens": result.loss_tokens,
        "seconds": time.perf_counter() - t0,
        "predictions": result.predictions,
    }


def evaluate_benchmarks(cfg, specs, trained_dir: str | Path | None = None, device: str | None = None) -> dict:
    """Load the model as evaluate_config does and run the benchmarks of `specs` (BenchmarkSpecs) on it: eval.json's
    content, plus "benchmark_predictions" ({name: predictions}). The untrained baseline comes from (and goes to) the
    baseline cache the training runs share."""
    from .evaluation.benchmarks import BenchmarkSuite, load_benchmark

    t0 = time.perf_counter()
    benchmarks = [load_benchmark(s) for s in specs]  # a bad file fails before the model loads
    with _loaded(cfg, trained_dir, device) as m:
        baseline = trained_dir is None
        suite = BenchmarkSuite(
            benchmarks,
            m.processor,
            m.device,
            cfg.trainer.eval_batch_size,
            cfg.trainer.eval_max_new_tokens,
            m.autocast,
            baseline_key=(m.model_dir, {"precision": m.precision}) if baseline else None,
        )
        results = [suite.run(m.model, bench, baseline) for bench in suite.benchmarks]
    metrics = {k: v for r in results for k, v in r.log_metrics().items()}
    return {
        **m.header,
        "benchmarks": {
            r.name: {"path": r.path, "task": r.task, "circular": r.circular, "cached": r.cached} for r in results
        },
        "batch_size": cfg.trainer.eval_batch_size,
        "max_new_tokens": cfg.trainer.eval_max_new_tokens,
        "device": str(m.device),
        "precision": m.precision,
        "metrics": metrics,
        "seconds": time.perf_counter() - t0,
        "benchmark_predictions": {r.name: r.predictions for r in results},
    }


def write_eval(out: dict, path: str | Path) -> Path:
    """eval.json (everything but the predictions) and <stem>.predictions.jsonl beside it (benchmarks:
    eval/<benchmark>.jsonl)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    predictions = out.pop("predictions", None)
    per_benchmark = out.pop("benchmark_predictions", {})
    path.write_text(json.dumps(out, indent=2) + "\n")
    if predictions is not None:
        path.with_suffix(".predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in predictions))
    for name, rows in per_benchmark.items():  # beside the scores: eval/<benchmark>.jsonl
        (path.parent / "eval").mkdir(exist_ok=True)
        (path.parent / "eval" / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in rows))
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m deepseek_vl2_lora.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "path", nargs="?", help="a run dir, a trained-state dir or a checkpoint dir (default: the base model)"
    )
    ap.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. data.eval_limit=8)")
    ap.add_argument("--baseline", action="store_true", help="evaluate the base model without the trained state")
    ap.add_argument("--out", help="the eval.json to write (default: in the run/trained dir; else outputs/eval/...)")
    ap.add_argument("--device", help="cpu | cuda (default: the config's trainer.device)")
    ap.add_argument(
        "--benchmark",
        action="append",
        default=[],
        metavar="FILE",
        help="a VLMEvalKit .tsv (or Hub .parquet) benchmark, repeatable: evaluate on these instead of the eval split",
    )
    ap.add_argument("--limit", type=int, help="with --benchmark: the first N questions of each")
    args = ap.parse_args(argv)
    if args.path is not None and "=" in args.path and not Path(args.path).exists():  # only overrides were given
        args.overrides.insert(0, args.path)
        args.path = None

    from .evaluation.benchmarks import parse_specs
    from .training import USER_ERRORS

    try:
        with tempfile.TemporaryDirectory(prefix="vl2-eval-") as scratch:  # a step checkpoint's export
            kind, cfg, trained_dir, default_out = resolve_target(args.path, args.baseline, args.overrides, scratch)
            if args.benchmark:
                out = evaluate_benchmarks(cfg, parse_specs(args.benchmark, args.limit), trained_dir, args.device)
            else:
                if args.limit is not None:
                    raise EvalError("--limit goes with --benchmark; for the eval split use data.eval_limit=N")
                out = evaluate_config(cfg, trained_dir, args.device)
    except (EvalError, FileNotFoundError, *USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        path = Path(args.out)
    elif default_out is not None:
        path = default_out
    else:
        path = (
            Path("outputs")
            / "eval"
            / f"{Path(out['model_dir']).name}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
            / "eval.json"
        )
    out["source"] = str(args.path) if args.path else None
    write_eval(out, path)
    m = out["metrics"]
    if args.benchmark:
        scores = ", ".join(f"{name} {m[f'eval/{name}/accuracy']:.4f}" for name in out["benchmarks"])
        print(f"{out['label']}: {scores} -> {path}")
        return 0
    loss = f"loss {m['eval/loss']:.4f}" if "eval/loss" in m else "no loss"
    acc = f"accuracy {m['eval/accuracy']:.4f} ({m['eval/samples']} samples)" if "eval/accuracy" in m else "no accuracy"
    print(f"{out['label']}: {loss}, {acc} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
