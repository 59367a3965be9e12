"""SIGTERM / SIGINT during training: finish the current step, write a checkpoint, then stop.

Preemptible machines send SIGTERM and allow a grace period; Ctrl-C sends SIGINT. Either way the step in
flight completes (so the checkpoint is a clean step boundary and resuming is exact). A second Ctrl-C
stops at once, keeping the last complete checkpoint.
"""

from __future__ import annotations

import signal
import sys
import threading

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class StopOnSignal:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step, then writing a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
