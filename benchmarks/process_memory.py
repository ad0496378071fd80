"""This process's memory as the kernel counts it (`/proc/self/status`), and its peak over a stretch of code.

- `RssAnon`: resident anonymous memory, which the kernel cannot drop (only swap it, and these machines have none):
  what a budget on host memory bounds.
- `VmRSS`: everything resident, also the pages of memory-mapped files (page cache the kernel may drop whenever it
  needs the memory, unless the process keeps using them). `VmHWM` is the kernel's own peak of `VmRSS`.
"""

import threading
import time


def memory_status() -> dict[str, int]:
    """`RssAnon`, `RssFile`, `VmRSS` and `VmHWM` of this process, in bytes."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) * 1024  # the kernel reports kB
    return values


class PeakMemory:
    """
    Context manager sampling `memory_status()` every `interval` seconds on a thread, for the peaks of `RssAnon`
    and `VmRSS` (the kernel keeps no peak of `RssAnon`; a spike shorter than `interval` can be missed, so the
    sampled peak is a lower bound of the true one; `VmHWM`, read at the end, is exact for `VmRSS`).

    Attributes (after the block): `peak_anon`, `peak_rss` (bytes, sampled), `start` (the status on entry),
    `hwm` (`VmHWM` at the end, over the whole process lifetime).
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak_anon = self.peak_rss = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        status = memory_status()
        self.peak_anon = max(self.peak_anon, status["RssAnon"])
        self.peak_rss = max(self.peak_rss, status["VmRSS"])

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        self.start = memory_status()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.hwm = memory_status()["VmHWM"]
