"""The benchmark script runs end to end (CPU-sized shapes) and its two paths compute the same training step.
No timing is asserted here: speed goals live in docs/benchmarks.md, measured on the GPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_paths_agree_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "scripts/bench.py",
        "--shapes",
        "cpu-tiny",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    data = json.loads(out.read_text())
    assert [r["router"] for r in data["results"]] == ["uniform", "skewed"]
    skewed = data["results"][1]
    assert skewed["expert_imbalance"] > data["results"][0]["expert_imbalance"]
    for row in data["results"]:
        assert row["loss_rel_diff"] < 1e-5  # fp32 on CPU: the same function up to rounding
        assert row["worst_grad_rel_diff"] < 1e-4
        assert row["reference"]["tokens_per_s"] > 0 and row["optimized"]["tokens_per_s"] > 0
