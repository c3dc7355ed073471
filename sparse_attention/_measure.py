"""Measuring helpers shared by the demo and the benchmark."""

import os
import threading
import time


class PeakMemory:
    """Peak resident memory above the level at start, sampled from /proc (Linux)."""

    def __init__(self, interval=0.005):
        self.interval = interval
        self.available = os.path.exists("/proc/self/statm")
        self.page = os.sysconf("SC_PAGE_SIZE") if self.available else 0

    def _rss(self):
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self.page

    def __enter__(self):
        self.peak = self.start = self._rss() if self.available else 0
        self._stop = threading.Event()
        if self.available:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        if self.available:
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def megabytes(self):
        return (self.peak - self.start) / 2**20 if self.available else float("nan")
