"""Bounded-time diagnosis of hangs: a step that runs past `launch.hang_timeout_s` prints what it was
doing (every thread's stack) and ends the process, so the launcher stops the other ranks instead of
the job hanging silently. Collectives also have their own timeout (`launch.timeout_s`), but some
asynchronous ones (DeepSpeed's, on gloo) wait forever: this catches those too."""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time


class StepWatchdog:
    def __init__(self, timeout_s: float, rank: int):
        self.timeout_s, self.rank = timeout_s, rank
        self._timer: threading.Timer | None = None

    def _fire(self, step: int, started: float) -> None:
        print(f"longtrain: rank {self.rank}: step {step} has run for {time.monotonic() - started:.0f}s "
              f"(launch.hang_timeout_s={self.timeout_s:g}): a peer rank died or a collective hangs. "
              "Stacks of every thread follow; exiting.", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(1)

    def arm(self, step: int) -> None:
        if self.timeout_s <= 0:
            return
        self.disarm()
        self._timer = threading.Timer(self.timeout_s, self._fire, args=(step, time.monotonic()))
        self._timer.daemon = True
        self._timer.start()

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
