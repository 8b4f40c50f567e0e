"""Peak resident memory of a block of code, sampled on a thread (used by the benchmarks).

Linux only (reads ``/proc/self/statm``). The sampling thread runs while the measured code
releases the GIL (file writes, tensor kernels), which is where the memory goes.
"""

from __future__ import annotations

import gc
import os
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """``with PeakRSS() as p: ...``; then ``p.extra`` is the peak RSS above the starting RSS."""

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.start = self.peak = rss_bytes()
        self.extra = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.extra = self.peak - self.start
