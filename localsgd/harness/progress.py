"""A dependency-free progress bar with rate and ETA (for one process: rank 0 only)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """``Progress(total, "label")``; ``update(n)`` after each unit; ``close()`` at the end."""

    def __init__(
        self,
        total: int,
        label: str = "",
        unit: str = "step",
        stream: TextIO | None = None,
        enabled: bool = True,
        min_interval: float = 0.2,
    ) -> None:
        self.total, self.label, self.unit = total, label, unit
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        # Not a terminal (a log file, CI): a line every 30 s instead of redrawing one line.
        self.min_interval = min_interval if self.tty else 30.0
        self.done = 0
        self.start = self._last = time.perf_counter()
        self.postfix = ""

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.done += n
        if postfix is not None:
            self.postfix = postfix
        now = time.perf_counter()
        if now - self._last >= self.min_interval:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        if not self.enabled:
            return
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(20 * frac)
        start = "\r" if self.tty else ""
        line = (
            f"{start}{self.label} [{bar:<20}] {self.done}/{self.total} {self.unit}s "
            f"{rate:.1f} {self.unit}/s ETA {_clock(eta)} {self.postfix}"
        )
        self.stream.write(line.rstrip() + (" " if self.tty else "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()
