"""Progress a log without a terminal can read (nohup, Slurm): tqdm draws bars only on a terminal, so elsewhere a
line comes every so many updates or LINE_SECONDS, whichever is first. Both stages report through it."""

from __future__ import annotations

import sys
import time

LINE_SECONDS = 30.0  # a progress line at least this often when no bar is shown


def bars_shown(progress: bool) -> bool:
    """Whether tqdm draws bars here (it draws none on a stderr that is not a terminal)."""
    return progress and sys.stderr.isatty()


class ProgressLines:
    """Decides when a line is due (every ``interval`` updates or LINE_SECONDS; never where bars show or with
    interval 0) and says the pace of the images done so far."""

    def __init__(self, log, interval: int, shown: bool):
        self.log, self.interval = log, interval
        self.enabled = interval > 0 and not shown
        self.start()

    def start(self) -> None:
        self._started = self._last = time.perf_counter()
        self._updates = 0

    def due(self) -> bool:
        """Count one update; whether a line is due after it."""
        self._updates += 1
        now = time.perf_counter()
        if not self.enabled or (self._updates % self.interval and now - self._last < LINE_SECONDS):
            return False
        self._last = now
        return True

    def pace(self, images: int, total: int) -> str:
        """Images per second since start() and the time left at that rate."""
        rate = images / max(time.perf_counter() - self._started, 1e-9)
        return f"{rate:.0f} img/s | eta {(total - images) / rate if rate else 0.0:.0f} s"
