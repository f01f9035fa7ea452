"""Stopping gracefully: signals, a dead launcher, and the SLURM requeue.

SIGUSR2 (SLURM's warning before the time limit), SIGTERM (scancel, preemption), the first SIGINT (Ctrl-C) and the
death of the launcher (torchrun) only set a flag. The train loop checks it at each step boundary, the ranks agree
(if any rank was told to stop, every rank stops at the same step), save, rank 0 requeues the job under SLURM, and
all exit 0. More signals during the save change nothing, except a SIGINT that comes more than INT_GRACE_S after
the first one: the user insists, and the process aborts at once (the next start cleans what the save left).
"""

import logging
import os
import signal
import sys
import threading
import time

logger = logging.getLogger(__name__)

INT_GRACE_S = 2.0  # Ctrl-C reaches a worker twice at once (from the terminal and from torchrun): one request


class PreemptionHandler:
    def __init__(self, signals=(signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)):
        self.requested = False
        self.signal_name = None
        self._signals = signals
        self._first_int = None

    def install(self, watch_parent: bool = False) -> "PreemptionHandler":
        """Handle the signals; with `watch_parent`, also stop when the parent process (the launcher) dies: its
        workers must not keep training and committing checkpoints with nobody watching."""
        for sig in self._signals:
            signal.signal(sig, self._on_signal)
        if watch_parent:
            parent = os.getppid()
            threading.Thread(target=self._watch_parent, args=(parent,), name="watch-launcher", daemon=True).start()
        return self

    def _request(self, why: str) -> None:
        if not self.requested:
            self.requested = True
            self.signal_name = why
            # Logging from a signal handler can deadlock on the handler's lock; write directly.
            os.write(2, f"received {why}: will checkpoint at the end of this step and exit\n".encode())

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._first_int is not None and now - self._first_int > INT_GRACE_S:
                os.write(2, b"second SIGINT: aborting without a checkpoint\n")
                sys.stderr.flush()
                os._exit(130)
            self._first_int = self._first_int or now
        self._request(signal.Signals(signum).name)

    def _watch_parent(self, parent: int) -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        self._request(f"the death of the launcher (pid {parent})")

    def requeue(self, max_requeues: int) -> None:
        """Rank 0, after the stop checkpoint is committed: requeue the job if it runs under SLURM."""
        from lingua.slurm import in_slurm_job, requeue_current_job

        if in_slurm_job():
            requeue_current_job(max_requeues)
