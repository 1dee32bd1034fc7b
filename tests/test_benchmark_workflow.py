"""Benchmarks in training, in the eval CLI and in the comparison report, on the tiny random model (a few steps)."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_config import compose_cfg

from deepseek_vl2_lora import compare as compare_mod
from deepseek_vl2_lora import eval as eval_mod
from deepseek_vl2_lora.training import train
from deepseek_vl2_lora.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = (
    "trainer.eval_benchmarks=[{path:data/demo/bench_mcq.tsv,limit:3,circular:true},"
    "{path:data/demo/bench_vqa.tsv,limit:4}]"
)


@pytest.fixture(autouse=True)
def tiny_cache(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp() / "tiny_cache"  # shared with the other tests: generated once
    monkeypatch.setenv("DEEPSEEK_VL2_LORA_CACHE", str(root))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return root


def _json(path: Path):
    return json.loads(path.read_text())


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_training_logs_benchmarks_before_and_after_and_caches_the_baseline(tmp_path, tiny_cache, caplog):
    caplog.set_level(logging.INFO)
    run_dir = tmp_path / "run"
    train(compose_cfg("experiment=smoke", "data.eval_limit=4", BENCHMARKS), run_dir)
    evals = read_metrics(run_dir, "eval")
    assert [(r["step"], r["eval/tag"]) for r in evals] == [(0, "before"), (3, "after")]
    for r in evals:
        assert 0.0 <= r["eval/bench_mcq/accuracy"] <= 1.0 and 0.0 <= r["eval/bench_vqa/accuracy"] <= 1.0
        # Demo questions 0-2 are colour, shape, count; 2-4 options each, every rotation asked.
        assert (r["eval/bench_mcq/questions"], r["eval/bench_mcq/asked"]) == (3, 4 + 3 + 3)
        assert {k for k in r if k.startswith("eval/bench_mcq/accuracy/")} == {
            "eval/bench_mcq/accuracy/colour",
            "eval/bench_mcq/accuracy/shape",
            "eval/bench_mcq/accuracy/count",
        }
        assert r["eval/bench_vqa/questions"] == 4 and "eval/accuracy" in r  # the eval split still runs
    summary = _json(run_dir / "summary.json")
    assert summary["eval_before"]["eval/bench_vqa/accuracy"] == evals[0]["eval/bench_vqa/accuracy"]
    after = _lines(run_dir / "eval" / "bench_mcq" / "step_00000003.jsonl")
    assert len(after) == 10 and {"prediction", "parsed", "reference", "score", "prompt"} <= after[0].keys()
    # The scores in the log are those of the predictions written.
    vqa = _lines(run_dir / "eval" / "bench_vqa" / "step_00000003.jsonl")
    assert evals[1]["eval/bench_vqa/accuracy"] == pytest.approx(sum(p["score"] for p in vqa) / 4)
    assert not any("cached baseline" in m for m in caplog.messages)

    # Another run on the same model (another policy) reads the baseline from the cache: same numbers, not generated.
    caplog.clear()
    other = tmp_path / "other"
    train(
        compose_cfg("experiment=smoke", "data.eval_limit=4", "trainer.max_steps=1", "policy=lora_o_mlp", BENCHMARKS),
        other,
    )
    assert sum("cached baseline" in m for m in caplog.messages) == 2
    before = read_metrics(other, "eval")[0]
    assert {k: v for k, v in before.items() if "/bench_" in k} == {k: v for k, v in evals[0].items() if "/bench_" in k}
    assert len(list((tiny_cache / "benchmark_baselines").glob("*.json"))) == 2

    # The eval CLI on the run: eval.json with the benchmark scores and eval/<benchmark>.jsonl beside it, equal to
    # the run's final eval; --baseline gives the cached untrained numbers.
    out = tmp_path / "cli" / "eval.json"
    args = [str(run_dir), "--benchmark", "data/demo/bench_vqa.tsv", "--limit", "4", "--out", str(out)]
    assert eval_mod.main(args) == 0
    ev = _json(out)
    assert ev["kind"] == "trained" and ev["benchmarks"]["bench_vqa"]["task"] == "vqa"
    assert ev["metrics"]["eval/bench_vqa/accuracy"] == pytest.approx(evals[1]["eval/bench_vqa/accuracy"])
    assert [p["prediction"] for p in _lines(out.parent / "eval" / "bench_vqa.jsonl")] == [p["prediction"] for p in vqa]
    assert eval_mod.main([*args[:-1], str(tmp_path / "base" / "eval.json"), "--baseline"]) == 0
    base = _json(tmp_path / "base" / "eval.json")
    assert base["benchmarks"]["bench_vqa"]["cached"] is True
    assert base["metrics"]["eval/bench_vqa/accuracy"] == evals[0]["eval/bench_vqa/accuracy"]


def test_bad_benchmark_is_a_one_line_error(tmp_path, capsys):
    assert eval_mod.main(["--benchmark", str(tmp_path / "nope.tsv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.tsv: benchmark file not found" in err and err.count("\n") == 1
    bad = tmp_path / "bad.tsv"
    bad.write_text("index\tquestion\tanswer\timage\n0\tQ\ta\tnot-base64!\n")
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "experiment=smoke",
            f"trainer.eval_benchmarks=[{bad}]",
            f"hydra.run.dir={tmp_path}/r",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"error: {bad}: row 1 (index 0), column image: not valid base64" in proc.stderr


def _fake_run(run_dir: Path, policy: str, seed: int, before: dict, after: dict) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(
        json.dumps({"steps": 10, "seconds": 1.0, "eval_before": before, "eval_after": after})
    )
    (run_dir / "trainable_parameters.json").write_text(
        json.dumps({"policy": policy, "trainable_params": 5, "percent": 1.0})
    )
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text(f"- policy={policy}\n- seed={seed}\n")
    records = [{"step": 10, "kind": "train", "train/loss": 1.0, "train/tokens": 100, "perf/step_time_s": 1.0}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_compare_shows_benchmark_columns_mean_std_and_difference_to_baseline(tmp_path):
    base = {"eval/bench_mcq/accuracy": 0.25, "eval/bench_vqa/accuracy": 0.0}
    sweep = tmp_path / "sweep"
    runs = [
        ("a", 0, {"eval/bench_mcq/accuracy": 0.5, "eval/bench_vqa/accuracy": 0.75}),
        ("a", 1, {"eval/bench_mcq/accuracy": 0.7, "eval/bench_vqa/accuracy": 0.85}),
        ("b", 0, {"eval/bench_mcq/accuracy": 0.25, "eval/bench_vqa/accuracy": 0.5}),
        ("b", 1, {"eval/bench_mcq/accuracy": 0.25, "eval/bench_vqa/accuracy": 0.5}),
    ]
    for i, (policy, seed, after) in enumerate(runs):
        _fake_run(sweep / str(i), policy, seed, base, after)
    report = compare_mod.write_report(compare_mod.load_paths([sweep]), tmp_path / "out")
    lines = report["table"].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[7:9] == ["bench_mcq", "bench_vqa"]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    assert cells["untrained baseline"][7:9] == ["0.250", "0.000"]  # one baseline: the runs' identical ones
    assert cells["policy=a, seed=0"][7:9] == ["0.500 (+0.250)", "0.750 (+0.750)"]
    assert cells["policy=b, seed=1"][7:9] == ["0.250 (+0.000)", "0.500 (+0.500)"]
    agg = report["aggregate"].splitlines()
    assert [c.strip() for c in agg[0].strip("|").split("|")][6:8] == ["bench_mcq", "bench_vqa"]
    row_a = [c.strip() for c in agg[2].strip("|").split("|")]
    # a: mcq mean 0.6, sample std sqrt(0.02) = 0.141, +0.35 over the baseline; vqa 0.8 ± 0.071, +0.8.
    assert row_a[0] == "policy=a" and row_a[6:8] == ["0.600 ± 0.141 (+0.350)", "0.800 ± 0.071 (+0.800)"]
