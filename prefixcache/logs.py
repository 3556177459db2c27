"""Logging helpers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class ThrottledWarning:
    """A warning logged at most once per ``interval`` seconds, with a count of the
    ones held back meanwhile (a full disk fails every write; one line a minute says so)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.clock = interval, clock
        self.last: float | None = None
        self.held_back = 0

    def __call__(self, log: logging.Logger, message: str, *args) -> bool:
        now = self.clock()
        if self.last is not None and now - self.last < self.interval:
            self.held_back += 1
            return False
        if self.held_back:
            message += f" (and {self.held_back} more since the last such warning)"
        log.warning(message, *args)
        self.last, self.held_back = now, 0
        return True
