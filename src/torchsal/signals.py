"""Ctrl-C and SIGTERM during training: finish the current step, write a checkpoint, say how to resume."""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopRequests:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current step instead of killing the run
    mid-step (the loop then writes a checkpoint). A second signal interrupts at once, as usual."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequests:
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
