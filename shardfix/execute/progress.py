"""Progress: one byte-weighted bar on a terminal, a log line now and then otherwise."""

from __future__ import annotations

import logging
import shutil
import sys
import time
from typing import Any

from shardfix.io.units import format_bytes

log = logging.getLogger("shardfix.execute")

class Progress:
    """One byte-weighted progress bar on a terminal; a log line every ``interval`` seconds otherwise.

    ``enabled``: True forces the bar, False turns progress output off, None picks by ``isatty``.
    """

    def __init__(self, total: int, enabled: bool | None, *, already: int = 0, interval: float = 10.0,
                 stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.total = max(total + already, 1)
        self.done = already
        self.off = enabled is False
        self.tty = (enabled is True) or (enabled is None and self.stream.isatty())
        self.interval = interval
        self.t0 = time.perf_counter()
        self._last_log = self.t0
        self._fresh = 0  # bytes written by this run (the rate excludes resumed bytes)
        self.width = shutil.get_terminal_size((100, 20)).columns if self.tty else 100

    def advance(self, nbytes: int, label: str) -> None:
        self.done += nbytes
        self._fresh += nbytes
        if self.off:
            return
        frac = min(self.done / self.total, 1.0)
        elapsed = time.perf_counter() - self.t0
        rate = self._fresh / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        if self.tty:
            bar_w = max(10, min(30, self.width - 70))
            bar = "#" * int(frac * bar_w)
            line = (f"[{bar:<{bar_w}}] {frac:6.1%} {format_bytes(self.done, 1)}/{format_bytes(self.total, 1)} "
                    f"{rate / 1e6:7.1f} MB/s eta {left:5.0f}s {label}")
            self.stream.write("\r" + line[: self.width - 1].ljust(self.width - 1))
            self.stream.flush()
        elif time.perf_counter() - self._last_log >= self.interval or frac >= 1.0:
            log.info("progress %.1f%% (%s of %s, %.1f MB/s, eta %.0fs): %s", frac * 100, format_bytes(self.done, 1),
                     format_bytes(self.total, 1), rate / 1e6, left, label)
            self._last_log = time.perf_counter()

    def close(self) -> None:
        if self.tty and not self.off:
            self.stream.write("\n")
            self.stream.flush()
