"""Stop a run at the next optimizer step on SIGTERM, SIGUSR1 or SIGINT, with a checkpoint, instead of dying.

SIGTERM is what SLURM (at the time limit, on preemption) and Kubernetes send before SIGKILL; SIGUSR1 is what
`#SBATCH --signal=USR1@120` sends ahead of the time limit (scripts/slurm_train.sbatch); SIGINT is Ctrl-C.

    stop = Preemption()              # installs the handlers (main thread only), restores the old ones on close()
    ...                              # setup: a signal raises Interrupted (nothing to save yet)
    stop.arm()                       # the loop starts; before each optimizer step:
    if stop.requested(engine): ...   # every rank gets the same answer (the flag is summed over ranks)

The handler only records the signal: the loop finishes the step it is in, writes a checkpoint, logs a
`preempted` event and the process exits with PREEMPTED_EXIT. A second signal while the first is pending (and more
than DUPLICATE_WINDOW_S after it) restores the default action and re-raises it: the process ends at once (for
SIGINT: killed by SIGINT, no traceback).

Under DeepSpeed every rank installs the handlers and the ranks agree (a sum over ranks after each step) to stop at
the same step and save together. The launch scripts make the launcher processes ignore SIGTERM, SIGINT and
SIGUSR1 (`trap '' ...` before `exec deepspeed`): a signal to the whole job (SLURM's, Ctrl-C's) reaches the ranks
directly and the launchers wait for them. DeepSpeed's per-node launcher still installs its own SIGTERM/SIGINT
handler, which sends the ranks SIGTERM (taken as the same signal) and kills them 30 s later: under DeepSpeed,
SIGUSR1 (ignored by the launcher) gives the ranks all the time they need, SIGTERM and SIGINT 30 s.
"""

from __future__ import annotations

import os
import signal
import threading
import time

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# The exit status of a run stopped by a signal after its checkpoint: EX_TEMPFAIL from sysexits.h ("try again
# later"). Not 0, so a scheduler that restarts failed jobs (Kubernetes, `scontrol requeue` in our sbatch script)
# runs it again, and not 128 + signal, so it is told apart from a process killed without a checkpoint.
PREEMPTED_EXIT = 75
# A signal within this many seconds of the first is taken for the same one: a terminal's Ctrl-C, and SLURM at the
# time limit, signal every process of the job, and DeepSpeed's launcher then sends each rank a SIGTERM of its own.
DUPLICATE_WINDOW_S = 3.0


class Interrupted(RuntimeError):
    """A signal before the training loop started: raised from the handler, the run stops without a checkpoint."""


class Preemption:
    """The signal handlers for one run. `received` is the first signal's number (None: none yet)."""

    def __init__(self, signals=PREEMPT_SIGNALS):
        self.received: int | None = None
        self._first = 0.0
        self.armed = False  # set by arm() when the loop starts; until then a signal raises Interrupted
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # Python delivers signals to the main thread only; train() called from a thread: no handlers
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.received is not None and now - self._first < DUPLICATE_WINDOW_S:
            return  # the same event reaching us twice (the launcher forwards what the process group got)
        if self.received is not None:  # the second signal: the default action, now
            os.write(2, f"\n{signal.Signals(signum).name} again: exiting without a checkpoint\n".encode())
            self.close()
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.received, self._first = signum, now
        if not self.armed:  # setup (model, data, eval before training): nothing to save, stop now
            name = signal.Signals(signum).name
            raise Interrupted(f"{name} before the first optimizer step: nothing to save")
        os.write(
            2,
            f"\n{signal.Signals(signum).name}: stopping after this optimizer step with a checkpoint "
            "(send it again to exit at once)\n".encode(),
        )

    def arm(self) -> None:
        """From now on (the training loop) a signal is a request to checkpoint and stop."""
        self.armed = True

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    def requested(self, engine=None) -> bool:
        """Whether to stop now; with several ranks, whether any rank got a signal (a collective: all ranks call)."""
        flag = self.received is not None
        world_size = getattr(getattr(engine, "env", None), "world_size", 1)
        if engine is not None and world_size > 1:
            (flag,) = engine.sum_over_ranks([float(flag)])
        return bool(flag)

    def close(self) -> None:
        """Put the handlers that were there before back."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
