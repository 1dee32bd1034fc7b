"""Kill a real training process with SIGKILL mid-run, resume it with trainer.resume=auto, and get the losses and
trained weights of the uninterrupted run bit for bit (CPU, same config)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from deepseek_vl2_lora.training.metrics import read_metrics
from deepseek_vl2_lora.training.train_state import CHECKPOINTS, LATEST

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS = 40
# 32 samples, micro batch 4, 2 micro batches per step: 4 steps per epoch, so checkpoints every 3 steps fall
# mid-epoch. LoRA with dropout makes the result depend on the restored torch RNG stream too.
ARGS = [
    "experiment=smoke",
    "data.train_limit=32",
    "data.eval_path=null",
    "trainer.micro_batch_size=4",
    "trainer.grad_accum=2",
    f"trainer.max_steps={MAX_STEPS}",
    "trainer.save_every=3",
    "trainer.keep_last=2",
    "trainer.eval_before=false",
    "optim.warmup_steps=5",
    "policy=mla_lowrank_lora",
    *(f"policy.groups.{g}.dropout=0.1" for g in ("o_proj", "mlp_dense", "shared_experts")),
]
COMPARED = ("train/loss", "train/aux_loss", "train/grad_norm", "train/lr", "train/tokens", "train/epoch")


def launch(run_dir: Path, tmp_root: Path, *extra: str, **extra_env: str) -> subprocess.Popen:
    """train.py with ARGS and `extra` overrides in the background (output: output(run_dir))."""
    env = {
        **os.environ,
        "DEEPSEEK_VL2_LORA_CACHE": str(tmp_root / "tiny_cache"),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",  # two runs side by side on two cores, without thread oversubscription
        "PYTHONPATH": str(ROOT),
        **extra_env,
    }
    log = open(run_dir.parent / f"{run_dir.name}.out", "w")
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *ARGS, *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def output(run_dir: Path) -> str:
    return (run_dir.parent / f"{run_dir.name}.out").read_text()


def curve(run_dir: Path) -> list[dict]:
    return [{k: r.get(k) for k in ("step", *COMPARED)} for r in read_metrics(run_dir, "train")]


def test_kill_and_resume_gives_the_uninterrupted_losses(tmp_path, tmp_path_factory):
    tmp_root = tmp_path_factory.getbasetemp()
    full, killed = tmp_path / "full", tmp_path / "killed"
    # The killed run goes first, while the machine is as idle as this test can make it: it must die mid-run.
    proc = launch(killed, tmp_root)
    latest = killed / CHECKPOINTS / LATEST
    deadline = time.monotonic() + 240
    while not (latest.exists() and latest.read_text().strip() >= "step_00000006"):
        assert proc.poll() is None, f"the run ended before it could be killed:\n{output(killed)}"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    steps_before_kill = [r["step"] for r in read_metrics(killed, "train")]
    assert steps_before_kill and steps_before_kill[-1] < MAX_STEPS
    assert not (killed / "summary.json").exists()

    resumed = launch(killed, tmp_root, "trainer.resume=auto")
    uninterrupted = launch(full, tmp_root)
    assert resumed.wait() == 0, output(killed)
    assert uninterrupted.wait() == 0, output(full)

    (event,) = [r for r in read_metrics(killed, "event") if r["event"] == "resume"]
    assert event["step"] >= 6 and event["step"] % 3 == 0 and event["step"] < MAX_STEPS
    expected = curve(full)
    assert [r["step"] for r in expected] == list(range(1, MAX_STEPS + 1))
    assert curve(killed) == expected  # exact equality of every logged loss, norm and lr
    a, b = (load_file(r / "trained" / "adapter_model.safetensors") for r in (full, killed))  # every trained tensor
    assert a.keys() == b.keys() and a
    for key in a:
        assert a[key].equal(b[key]), key


@pytest.mark.slow
def test_default_run_learns_within_three_minutes(tmp_path, tmp_path_factory):
    """README's first command, as is: it must finish in 3 minutes on 2 CPU cores and clearly beat the untrained
    model on the held-out eval split."""
    env = {**os.environ, "DEEPSEEK_VL2_LORA_CACHE": str(tmp_path_factory.getbasetemp() / "tiny_cache")}
    env.pop("OMP_NUM_THREADS", None)
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    before, after = summary["eval_before"]["eval/accuracy"], summary["eval_after"]["eval/accuracy"]
    assert after >= before + 0.5, (before, after)
    assert "eval accuracy: before training" in done.stdout + done.stderr
    assert seconds < 180, f"the default run took {seconds:.0f} s"
