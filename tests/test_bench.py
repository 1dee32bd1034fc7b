"""The benchmark script runs end to end (CPU-sized shapes) and its two paths compute the same training step.
No timing is asserted here: speed goals live in docs/benchmarks.md, measured on the GPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "scripts/bench.py", "--shapes", "cpu-tiny", "--steps", "1", "--warmup", "0", *args]
    subprocess.run([*cmd, "--out", str(out)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    return json.loads(out.read_text())


def test_bench_paths_agree_on_cpu(tmp_path):
    data = _bench(tmp_path, "--zipf", "2.0")  # 8 experts, 128 tokens: a strong skew to rise above noise
    assert [r["router"] for r in data["results"]] == ["uniform", "skewed"]
    skewed = data["results"][1]
    assert skewed["expert_imbalance"] > data["results"][0]["expert_imbalance"]
    for row in data["results"]:
        assert row["loss_rel_diff"] < 1e-5  # fp32 on CPU: the same function up to rounding
        assert row["worst_grad_rel_diff"] < 1e-4
        assert row["reference"]["tokens_per_s"] > 0 and row["optimized"]["tokens_per_s"] > 0


def test_bench_packed_rows_and_every_ablation(tmp_path):
    data = _bench(tmp_path, "--router", "skewed", "--sample-tokens", "16", "--paths", "all")
    (row,) = data["results"]
    assert row["samples"] > 2  # two rows, several samples each
    assert row["loss_rel_diff"] < 1e-5 and row["worst_grad_rel_diff"] < 1e-4
    paths = [k for k, v in row.items() if isinstance(v, dict)]
    assert paths == [
        "reference",
        "optimized",
        "optimized-grouped",
        "optimized-fused_attention",
        "optimized-lean_ce",
        "optimized+recompute",
        "optimized+selective",
        "optimized+feature_cache",
        "optimized+compile",
    ]
    assert row["optimized+recompute"]["recompute"] and not row["optimized"]["recompute"]
    assert row["optimized+selective"]["recompute_setting"] == "selective"
