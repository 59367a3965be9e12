"""SIGTERM / SIGINT during training: finish the current step, write a checkpoint, then stop.

Preemptible machines send SIGTERM and allow a grace period; Ctrl-C sends SIGINT. Either way the signal
becomes a stop request (training/events.py), the same one a server or the board uses: the step in flight
completes (so the checkpoint is a clean step boundary and resuming is exact). A second Ctrl-C stops at
once, keeping the last complete checkpoint.
"""

from __future__ import annotations

import signal
import threading
from typing import Callable

from tunesmith.training.events import StopRequest

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class StopOnSignal:
    def __init__(self, stop: StopRequest, note: Callable[[str], None]) -> None:
        self.stop, self.note = stop, note
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum
        name = signal.Signals(signum).name
        self.stop.request(f"{name} received", EXIT_CODES[signum])
        self.note(f"\n{name} received: finishing this step, then writing a checkpoint (Ctrl-C again to stop at once)")

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
