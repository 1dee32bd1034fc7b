"""Fault injection on real training processes (CPU, one process; the 2-rank ZeRO-2 case is in test_deepspeed.py).

Invariant: however a run is interrupted or its newest checkpoint damaged, the resumed run's logged losses, norms and
learning rates are bit for bit those of a run that was never interrupted (or resumed by hand from the checkpoint
it falls back to); what cannot be resumed is a one-line error, never a traceback.
"""

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_train_resume import MAX_STEPS, ROOT, curve, launch, output

from deepseek_vl2_lora.training.loop import FAULT_ENV
from deepseek_vl2_lora.training.manifest import MANIFEST_FILE
from deepseek_vl2_lora.training.metrics import read_metrics
from deepseek_vl2_lora.training.preemption import PREEMPTED_EXIT, Interrupted, Preemption
from deepseek_vl2_lora.training.run_lock import LOCK_FILE
from deepseek_vl2_lora.training.train_state import CHECKPOINTS, step_dir_name


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [r["step"] for r in read_metrics(run_dir, "train")] if path.exists() else []


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not any(s >= step for s in logged_steps(run_dir)):
        assert proc.poll() is None, f"the run ended before step {step}:\n{output(run_dir)}"
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.01)


def events(run_dir: Path, name: str) -> list[dict]:
    return [r for r in read_metrics(run_dir, "event") if r["event"] == name]


def assert_one_line_error(text: str, *needles: str) -> str:
    assert "Traceback" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("error: "), text[-3000:]
    for needle in needles:
        assert needle in last, (needle, last)
    return last


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = launch(run, tmp_path_factory.getbasetemp())
    assert proc.wait() == 0, output(run)
    return run


# ------------------------------------------------------------------------------------------------ signals
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_checkpoints_and_the_resumed_run_is_exact(sig, uninterrupted, tmp_path, tmp_path_factory):
    """The signal arrives at a random step (seeded per signal: reproducible). Periodic checkpoints are off, so the
    run resumes from the one the signal made."""
    at = random.Random(int(sig)).randint(2, MAX_STEPS - 8)
    run, tmp_root = tmp_path / "run", tmp_path_factory.getbasetemp()
    proc = launch(run, tmp_root, "trainer.save_every=0")
    wait_for_step(proc, run, at)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == PREEMPTED_EXIT, output(run)
    text = output(run)
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    (event,) = events(run, "preempted")
    stopped = event["step"]
    assert at <= stopped < MAX_STEPS and event["signal"] == sig.name
    assert logged_steps(run)[-1] == stopped
    assert event["checkpoint"] == str(run / CHECKPOINTS / step_dir_name(stopped))
    assert (run / CHECKPOINTS / step_dir_name(stopped) / MANIFEST_FILE).is_file()
    assert not (run / LOCK_FILE).exists() and not (run / "summary.json").exists()

    resumed = launch(run, tmp_root, "trainer.resume=auto", "trainer.save_every=0")
    assert resumed.wait() == 0, output(run)
    assert events(run, "resume")[0]["step"] == stopped
    assert curve(run) == curve(uninterrupted)  # every logged loss, norm and lr, bit for bit
    a, b = (load_file(r / "trained" / "adapter_model.safetensors") for r in (uninterrupted, run))  # all trained
    assert a.keys() == b.keys() and a and all(a[k].equal(b[k]) for k in a)


def test_a_second_signal_exits_at_once(tmp_path):
    """No model: the handler alone, in a child process that would otherwise sleep."""
    code = (
        "import os, signal, time\n"
        "from deepseek_vl2_lora.training.preemption import DUPLICATE_WINDOW_S, Preemption\n"
        "stop = Preemption()\n"
        "stop.arm()  # the training loop has started\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "os.kill(os.getpid(), signal.SIGTERM)  # at once: the same signal reaching us twice, ignored\n"
        "assert stop.received == signal.SIGTERM and stop.requested()\n"
        "print('first handled', flush=True)\n"
        "time.sleep(DUPLICATE_WINDOW_S + 0.2)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(5)\n"
        "print('still running')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGINT, done.stderr
    assert done.stdout == "first handled\n" and "Traceback" not in done.stderr
    assert "SIGINT again: exiting without a checkpoint" in done.stderr


def test_a_signal_during_setup_stops_at_once():
    """Before the loop (model loading, data, eval before training) there is nothing to save: the handler raises
    Interrupted, which train.py reports in one line (exit 75)."""
    stop = Preemption()
    try:
        with pytest.raises(Interrupted, match="SIGUSR1 before the first optimizer step: nothing to save"):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(5)  # the handler runs in this (the main) thread, between two bytecodes
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_sigkill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path):
    """A process killed inside save_checkpoint (after some files of step 2 are written) leaves step 1 as the
    checkpoint to resume from and a temporary directory that the next run removes."""
    code = (
        "import os, signal, sys, torch\n"
        "from deepseek_vl2_lora.training.engine import DistEnv, SingleProcessEngine\n"
        "from deepseek_vl2_lora.training.config import OptimConfig\n"
        "from deepseek_vl2_lora.training.train_state import TrainState, save_checkpoint\n"
        "model = torch.nn.Linear(3, 2)\n"
        "groups = [{'name': 'all', 'params': list(model.parameters()), 'lr': 0.1, 'weight_decay': 0.0}]\n"
        "engine = SingleProcessEngine(model, groups, OptimConfig(), max_steps=10, env=DistEnv())\n"
        "run = sys.argv[1]\n"
        "save_checkpoint(run, TrainState(step=1), dict(model.named_parameters()), engine, keep_last=0)\n"
        "engine.save = lambda directory: os.kill(os.getpid(), signal.SIGKILL)\n"
        "save_checkpoint(run, TrainState(step=2), dict(model.named_parameters()), engine, keep_last=0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    from deepseek_vl2_lora.training.train_state import clean_temporary, find_resume_checkpoint

    leftovers = [p.name for p in (tmp_path / CHECKPOINTS).iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == [".tmp-step_00000002"]
    assert find_resume_checkpoint("auto", tmp_path) == tmp_path / CHECKPOINTS / "step_00000001"
    clean_temporary(tmp_path)
    assert sorted(p.name for p in (tmp_path / CHECKPOINTS).iterdir()) == ["latest", "step_00000001"]


# ------------------------------------------------------------------------------------------------ damage
SHORT = "trainer.max_steps=12"  # every run of the damage tests: the same (shorter) schedule


@pytest.fixture(scope="module")
def crashed(tmp_path_factory) -> Path:
    """A run with checkpoints at steps 3 and 6 that crashed at step 8 (FAULT_ENV), as a template to copy."""
    run = tmp_path_factory.mktemp("crashed") / "run"
    proc = launch(run, tmp_path_factory.getbasetemp(), SHORT, "trainer.keep_last=0", **{FAULT_ENV: "0:8:raise"})
    assert proc.wait() != 0
    assert sorted(p.name for p in (run / CHECKPOINTS).glob("step_*")) == ["step_00000003", "step_00000006"]
    assert not (run / LOCK_FILE).exists()  # released on the way out of a failed run too
    return run


def _copy(template: Path, to: Path) -> Path:
    shutil.copytree(template, to)
    return to


def _flip_last_bytes(path: Path, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    for i in range(1, n + 1):
        data[-i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_newest_checkpoint_falls_back_exactly(crashed, tmp_path, tmp_path_factory):
    """Flipped bytes in step 6's tensor data (which safetensors would load silently) and a cut-off last line in
    metrics.jsonl: resume=auto warns, naming the file, and continues from step 3, bit for bit as a run resumed from
    step 3 by hand."""
    tmp_root = tmp_path_factory.getbasetemp()
    by_hand = _copy(crashed, tmp_path / "by_hand")
    proc = launch(by_hand, tmp_root, SHORT, f"trainer.resume={by_hand / CHECKPOINTS / 'step_00000003'}")
    assert proc.wait() == 0, output(by_hand)

    damaged = _copy(crashed, tmp_path / "damaged")
    _flip_last_bytes(damaged / CHECKPOINTS / "step_00000006" / "trainable.safetensors")
    with open(damaged / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "kind": "tra')
    proc = launch(damaged, tmp_root, SHORT, "trainer.resume=auto")
    assert proc.wait() == 0, output(damaged)
    text = output(damaged)
    assert "Traceback" not in text
    assert "step_00000006 is damaged, not using it: trainable.safetensors: checksum mismatch" in text
    assert "metrics.jsonl line" in text and "not a whole JSON record, dropped" in text
    assert events(damaged, "resume")[0]["from"] == str(damaged / CHECKPOINTS / "step_00000003")
    assert [r["step"] for r in curve(damaged)] == list(range(1, 13))
    assert curve(damaged) == curve(by_hand)
    a, b = (load_file(r / "trained" / "adapter_model.safetensors") for r in (by_hand, damaged))
    assert a.keys() == b.keys() and a and all(a[k].equal(b[k]) for k in a)


def test_no_intact_checkpoint_is_a_one_line_error(crashed, tmp_path, tmp_path_factory):
    run = _copy(crashed, tmp_path / "run")
    state = run / CHECKPOINTS / "step_00000003" / "state.json"
    state.write_text(state.read_text()[:40])  # truncated
    (run / CHECKPOINTS / "step_00000006" / "rng.pt").write_bytes(b"")  # zero bytes
    proc = launch(run, tmp_path_factory.getbasetemp(), SHORT, "trainer.resume=auto")
    assert proc.wait() == 1
    assert_one_line_error(
        output(run),
        "no intact checkpoint in",
        "step_00000006: rng.pt: empty (0 bytes",
        "step_00000003: state.json: truncated (40 bytes",
    )


# ------------------------------------------------------------------------------------------------ run dir lock
def test_a_second_process_on_a_live_run_dir_is_refused(tmp_path, tmp_path_factory):
    """The first run goes on until a SIGTERM once the second was refused: the lock is held for the whole run."""
    run, tmp_root = tmp_path / "run", tmp_path_factory.getbasetemp()
    first = launch(run, tmp_root, "trainer.max_steps=100000", "trainer.save_every=0")
    wait_for_step(first, run, 1)
    second = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run}", "experiment=smoke"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "DEEPSEEK_VL2_LORA_CACHE": str(tmp_root / "tiny_cache")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 1, second.stdout[-3000:] + second.stderr[-3000:]
    assert_one_line_error(second.stdout + second.stderr, f"{run} is in use by pid {first.pid} on ")
    assert first.poll() is None, output(run)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == PREEMPTED_EXIT, output(run)
    steps = logged_steps(run)
    assert steps == list(range(1, steps[-1] + 1))  # one run's records only, in order
    assert not (run / LOCK_FILE).exists()
