"""Stopping a run so it can go on later: SIGTERM and SIGINT become a request that the phase loop reads at
step boundaries, and a clock says when a mid-epoch checkpoint is due.

    with StopRequest().installed() as stop:     the loop checks `stop.signum` after every step
        ...                                      a second signal of the same kind acts at once

A cluster's preemption (SIGTERM, then SIGKILL after a grace period) and Ctrl-C both end with the current
step finished, `checkpoints/last.pt` written at that step, and exit code 128 + the signal's number
(143 for SIGTERM, 130 for SIGINT). What a `kill -9` leaves is the last complete checkpoint: at most
`every_s` seconds of work (engine/checkpoint.py writes atomically, so never half a file).
"""
from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager

from .errors import AsoseError

SIGNALS = (signal.SIGTERM, signal.SIGINT)
CHECKPOINT_EVERY_S = 180.0   # mid-epoch checkpoints: what a kill -9 loses at most (plus one step)


class Stopped(AsoseError):
    """The run stopped on a signal after writing its checkpoint; the exit code is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopRequest:
    def __init__(self):
        self.signum: int | None = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        # the next signal of this kind acts at once (Ctrl-C twice: KeyboardInterrupt; SIGTERM twice: exit)
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    @contextmanager
    def installed(self):
        """Catch SIGTERM and SIGINT while the block runs (only possible in the main thread; elsewhere the
        signals keep their handlers and the request never fires)."""
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in self._previous.items():
                signal.signal(s, handler)


class CheckpointClock:
    """Is a mid-epoch checkpoint due? Every `every_s` seconds of wall time (None: never; 0: every step)."""

    def __init__(self, every_s: float | None):
        self.every_s = every_s
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.every_s is not None and time.monotonic() - self.last >= self.every_s

    def reset(self) -> None:
        self.last = time.monotonic()
