"""One live training process per run directory: `<run dir>/run.lock`.

    lock = RunLock.acquire(run_dir)     # RunLockError (the owner's host, pid, start time) if the run is live
    ...
    lock.release()                      # removes the file if it is still ours

The file is created with O_CREAT | O_EXCL and holds the owner's host, pid, start time and SLURM job. A lock is
stale, and taken over with a warning, when
  - its host is this host and no process with its pid is alive (a run killed with SIGKILL, or the machine
    rebooted), or
  - it was written by an earlier run of this same SLURM job (same SLURM_JOB_ID, lower SLURM_RESTART_COUNT):
    SLURM starts a requeued job only once the previous one has ended, possibly on another node.
A lock from another host cannot be checked from here: it is refused, and the message says to delete the file
if that process is gone. (A pid reused by an unrelated process after a reboot also counts as alive: the same.)
Under DeepSpeed rank 0 holds the lock for the whole job.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"


class RunLockError(RuntimeError):
    """Another live process owns the run directory."""


def _slurm_job() -> str | None:
    job = os.environ.get("SLURM_JOB_ID")
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}" if job else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@dataclass
class Owner:
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    started: float = field(default_factory=time.time)
    slurm_job: str | None = field(default_factory=_slurm_job)

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"pid {self.pid} on {self.host} (since {when}{job})"

    def stale_because(self) -> str | None:
        """Why this owner is certainly gone, seen from the current process; None if it may be alive."""
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return "no such process on this host"
        mine = _slurm_job()
        if self.slurm_job and mine and self.slurm_job != mine:
            (job, restart), (my_job, my_restart) = self.slurm_job.rsplit(".", 1), mine.rsplit(".", 1)
            if job == my_job and int(restart) < int(my_restart):
                return f"an earlier run of SLURM job {job} (requeued)"
        return None


class RunLock:
    def __init__(self, path: Path, owner: Owner):
        self.path, self.owner = path, owner

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        path = Path(run_dir) / LOCK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        me = Owner()
        for _ in range(20):  # a stale lock is moved aside, then created again: another taker may win the race
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(json.dumps(asdict(me)) + "\n")
                return cls(path, me)
            owner, text = _read(path)
            if owner is None and text is None:
                continue  # released in between: try again
            if owner is None and time.time() - _mtime(path) < 5:
                time.sleep(0.5)  # just created, its owner is still writing it
                continue
            reason = "unreadable lock file" if owner is None else owner.stale_because()
            if reason is None:
                raise RunLockError(
                    f"{path.parent} is in use by {owner.describe()}: two runs in one run dir would interleave "
                    f"metrics.jsonl and checkpoints. Wait for it, stop it, or use another hydra.run.dir; if that "
                    f"process is gone (e.g. its node died), delete {path}"
                )
            aside = path.with_name(f".{LOCK_FILE}.stale-{me.host}-{me.pid}")
            try:
                os.replace(path, aside)
            except FileNotFoundError:
                continue
            if aside.read_text(errors="replace") != text:  # moved a new owner's lock aside: put it back
                os.replace(aside, path)
                continue
            aside.unlink()
            log.warning("taking over the lock %s: %s (%s)", path, text.strip()[:200], reason)
        raise RunLockError(f"{path}: could not take the lock (other processes are taking it at the same time)")

    def release(self) -> None:
        owner, _ = _read(self.path)
        if owner is not None and (owner.host, owner.pid, owner.started) == (
            self.owner.host,
            self.owner.pid,
            self.owner.started,
        ):
            self.path.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _read(path: Path) -> tuple[Owner | None, str | None]:
    """(the owner, the file's text); (None, text) if it does not parse, (None, None) if it is gone."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return None, None
    try:
        return Owner(**json.loads(text)), text
    except (ValueError, TypeError):
        return None, text
