"""Preemption: SIGUSR2 (SLURM's warning signal) and SIGTERM only set a flag; the train loop checks it at
each step boundary, the ranks agree, save the same step, requeue (SLURM) and exit 0. A second signal during
the save changes nothing: the flag is already set."""

import logging
import signal

logger = logging.getLogger(__name__)


class PreemptionHandler:
    def __init__(self, signals=(signal.SIGUSR2, signal.SIGTERM)):
        self.requested = False
        self.signal_name = None
        self._signals = signals

    def install(self) -> "PreemptionHandler":
        for sig in self._signals:
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        if not self.requested:
            self.requested = True
            self.signal_name = signal.Signals(signum).name
            # Logging from a signal handler can deadlock on the handler's lock; write directly.
            import os

            os.write(2, f"received {self.signal_name}: will checkpoint at the end of this step and exit\n".encode())
