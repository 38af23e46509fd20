"""The peak resident memory of a stretch of this process's work, as the kernel counts it: Linux's VmHWM,
reset through /proc/self/clear_refs before the stretch, less the resident size at its start.

The tests measure memory this way, not with tracemalloc: a CI run crashed (SIGSEGV in _tracemalloc.c's
traceback_new, on a native thread with no Python frame) while tracemalloc traced a process that Ray's
driver threads share. This also counts what tracemalloc never saw: PIL's, OpenCV's and Arrow's buffers.
"""

import ctypes
import ctypes.util

_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakRSS:
    """`with PeakRSS() as m: ...` then `m.bytes`: how far the resident size rose above its start."""

    bytes: int = 0

    def __enter__(self) -> "PeakRSS":
        # Freed heap that is still resident would take a new allocation without raising the peak: give it
        # back first, so the growth is what the stretch allocated.
        _LIBC.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        self._start = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.bytes = max(0, _status_kib("VmHWM") - self._start) * 1024
