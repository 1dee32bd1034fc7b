"""The run-dir lock (deepseek_vl2_lora/training/run_lock.py) without training: who is refused, which lock is stale."""

import json
import os
import socket
import subprocess
import sys

import pytest

from deepseek_vl2_lora.training.run_lock import LOCK_FILE, RunLock, RunLockError


def _write_lock(run_dir, **owner):
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": 0.0, "slurm_job": None, **owner}
    (run_dir / LOCK_FILE).write_text(json.dumps(record) + "\n")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_acquire_release_and_a_live_owner_is_refused(tmp_path):
    lock = RunLock.acquire(tmp_path)
    owner = json.loads((tmp_path / LOCK_FILE).read_text())
    assert (owner["host"], owner["pid"]) == (socket.gethostname(), os.getpid())
    with pytest.raises(RunLockError, match=rf"is in use by pid {os.getpid()} on {socket.gethostname()} \(since "):
        RunLock.acquire(tmp_path)
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    RunLock.acquire(tmp_path).release()


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path, caplog):
    dead = _dead_pid()
    _write_lock(tmp_path, pid=dead)
    lock = RunLock.acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert "taking over the lock" in caplog.text and "no such process on this host" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_FILE]  # nothing left aside
    lock.release()


def test_a_lock_from_another_host_is_refused_unless_an_earlier_run_of_this_slurm_job(tmp_path, monkeypatch):
    _write_lock(tmp_path, host="node-elsewhere", pid=_dead_pid(), slurm_job="77.0")
    with pytest.raises(RunLockError, match=f"pid .* on node-elsewhere .*delete {tmp_path / LOCK_FILE}"):
        RunLock.acquire(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job: may be alive
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with pytest.raises(RunLockError):
        RunLock.acquire(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "77")  # this job, requeued: its first run has ended
    lock = RunLock.acquire(tmp_path)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["slurm_job"] == "77.1"
    lock.release()


def test_an_unreadable_lock_is_taken_over_once_it_is_not_being_written(tmp_path):
    (tmp_path / LOCK_FILE).write_text("{garbage")
    os.utime(tmp_path / LOCK_FILE, (0, 0))  # old: not a lock whose owner is still writing it
    RunLock.acquire(tmp_path).release()


def test_release_leaves_a_lock_that_is_not_ours(tmp_path):
    lock = RunLock.acquire(tmp_path)
    _write_lock(tmp_path, pid=1, host="other")
    lock.release()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "other"
