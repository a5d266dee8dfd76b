"""Peak memory of a benchmark process, for bench_projection.py and bench_recorder.py (Linux).

VmHWM (all resident pages, memory-mapped files included) is reset by writing "5" to
/proc/self/clear_refs; `AnonSampler` samples RssAnon (anonymous memory only) in a thread.
"""

from __future__ import annotations

import threading
import time


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in keys:
                out[name] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """Reset VmHWM to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class AnonSampler(threading.Thread):
    """Samples RssAnon every ``interval`` seconds and keeps the maximum.

    Every ``every`` seconds it also calls ``tick`` (the probe prints its progress, so that a
    parent that times the child out still learns the peak so far).
    """

    def __init__(self, interval: float = 0.02, tick=None, every: float = 5.0):
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = proc_status()["RssAnon"]
        self._done = threading.Event()
        self.tick, self.every = tick, every

    def run(self) -> None:
        last = time.perf_counter()
        while not self._done.wait(self.interval):
            self.peak = max(self.peak, proc_status()["RssAnon"])
            if self.tick is not None and time.perf_counter() - last >= self.every:
                last = time.perf_counter()
                self.tick()

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, proc_status()["RssAnon"])
        return self.peak
