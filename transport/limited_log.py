"""Warnings that strangers can cause, at a bounded rate.

A process without the ring's keys (or, on a ring without keys, anyone who reaches a
port) can send junk as fast as it likes, and every piece of junk is a warning worth one
line. LimitedLog lets `burst` of them through per `period` seconds and counts the rest;
the count comes out as one line with the first warning of a later period, or at flush()
(the endpoint flushes when it closes).
"""

from __future__ import annotations

import logging
import time


class LimitedLog:
    def __init__(self, log: logging.Logger, burst: int = 10, period: float = 10.0) -> None:
        self._log, self.burst, self.period = log, burst, period
        self._since = time.monotonic()
        self._logged = self._held = 0
        self._last = ""

    def warning(self, message: str, *args: object) -> None:
        """log.warning(message, *args), unless `burst` went out this period already."""
        if time.monotonic() - self._since >= self.period:
            self.flush()
        if self._logged < self.burst:
            self._logged += 1
            self._log.warning(message, *args)
        else:
            self._held += 1
            self._last = message % args if args else message

    def flush(self) -> None:
        """Say how many warnings were held back, and start a new period."""
        if self._held:
            self._log.warning("... and %d more like these in %.0f s (the last: %s)",
                              self._held, time.monotonic() - self._since, self._last)
        self._since, self._logged, self._held = time.monotonic(), 0, 0
