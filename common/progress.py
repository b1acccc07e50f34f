"""Progress of long work, logged at a steady rate: count/total, items/s, ETA.

A 100k-image run on a cluster should show it is alive without flooding the log, so a
line is written at most every ``every`` seconds (and once at the end), never per item:

    progress = Progress(log, "augment: decoded", total=len(rows), unit="images")
    for chunk in chunks:
        ...
        progress.advance(len(chunk))
    progress.done()

Every step uses this one helper (validate, augment, train_head, fine_tune, evaluate).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

DEFAULT_EVERY_SECONDS = 10.0  # a line every 10 s: alive on a cluster, a few lines per minute


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Progress:
    """Counts work done and logs ``what: done/total (pct), rate unit/s, ETA`` every ``every`` s."""

    def __init__(
        self,
        log: logging.Logger,
        what: str,
        total: int | None,
        *,
        unit: str = "images",
        every: float = DEFAULT_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.log, self.what, self.total, self.unit, self.every = log, what, total, unit, every
        self.clock = clock
        self.count = 0
        self.started = self.last = clock()

    def line(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.count / elapsed
        if self.total:
            left = max(self.total - self.count, 0)
            eta = _duration(left / rate) if rate > 0 else "?"
            return (
                f"{self.what}: {self.count}/{self.total} {self.unit} "
                f"({100 * self.count / self.total:.1f}%), {rate:.1f} {self.unit}/s, ETA {eta}"
            )
        return f"{self.what}: {self.count} {self.unit}, {rate:.1f} {self.unit}/s"

    def advance(self, n: int = 1) -> None:
        self.count += n
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            self.log.info("%s", self.line())

    def done(self) -> None:
        elapsed = self.clock() - self.started
        self.log.info("%s; done in %s", self.line().split(", ETA")[0], _duration(elapsed))
