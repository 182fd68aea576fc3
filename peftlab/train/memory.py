"""Peak memory of a block of work: CUDA allocator peak on GPU, process RSS growth on CPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import sys
import threading
from pathlib import Path
from types import TracebackType

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def read_status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field such as ``VmRSS`` or ``VmHWM`` in KiB, or None if unreadable."""
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s*kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def current_rss_bytes() -> int | None:
    """Resident set size of this process in bytes (Linux), else None."""
    kib = read_status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _reset_high_water_mark() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); True only if it visibly worked."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    hwm, rss = read_status_kib("VmHWM"), read_status_kib("VmRSS")
    # After a reset the high-water mark equals the RSS at that moment (give 4 MiB of slack).
    return hwm is not None and rss is not None and hwm - rss < 4096


def release_free_heap() -> bool:
    """Hand memory that is freed but still resident back to the OS (glibc ``malloc_trim``).

    Without this, memory freed by earlier work in the process is reused without raising the RSS,
    and a peak measured as RSS growth would miss it. True if the call was made.
    """
    gc.collect()
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def _ru_maxrss_bytes() -> int:
    try:
        import resource  # noqa: PLC0415 - Unix only
    except ImportError:
        return 0
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class PeakMemory:
    """Context manager measuring peak memory while its block runs.

    ``peak_bytes`` is always the growth above the memory in use when the block began
    (``baseline_bytes``: the loaded model, its weights included), so the two add up to the total.
    On CUDA: ``torch.cuda.max_memory_allocated`` after resetting the peak stats, less the bytes
    allocated at the start. On CPU: the peak RSS above the RSS just before the block,
    read from VmHWM after resetting it through ``/proc/self/clear_refs``; where that is not
    permitted, VmRSS sampled every ``interval`` seconds by a background thread; without /proc,
    the growth of ``ru_maxrss``. Before the CPU baseline is read, freed heap memory is returned to
    the OS (:func:`release_free_heap`) so that reusing it counts as growth. ``method`` names what
    was used; ``peak_bytes`` is the result.
    """

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.05,
                 sample: bool = False) -> None:
        """Prepare to measure on ``device``; ``sample=True`` forces the sampling thread on CPU."""
        self.device = torch.device(device)
        self.force_sampling = sample
        self.interval = interval
        self.peak_bytes = 0
        self.baseline_bytes = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled_peak = 0

    def __enter__(self) -> PeakMemory:
        """Record the baseline and start measuring."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            self.method = "cuda_max_memory_allocated"
            return self
        release_free_heap()
        if not self.force_sampling and _reset_high_water_mark():
            self.baseline_bytes = current_rss_bytes() or 0
            self.method = "vmhwm"
        elif current_rss_bytes() is not None:
            self.baseline_bytes = current_rss_bytes() or 0
            self._sampled_peak = self.baseline_bytes
            self.method = "rss_sampling"
            self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
            self._thread.start()
        else:
            self.baseline_bytes = _ru_maxrss_bytes()
            self.method = "ru_maxrss"
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._sampled_peak = max(self._sampled_peak, current_rss_bytes() or 0)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Stop measuring and set ``peak_bytes``."""
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(0, int(torch.cuda.max_memory_allocated(self.device)) - self.baseline_bytes)
        elif self.method == "vmhwm":
            hwm = read_status_kib("VmHWM")
            self.peak_bytes = max(0, (hwm or 0) * 1024 - self.baseline_bytes)
        elif self.method == "rss_sampling":
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            peak = max(self._sampled_peak, current_rss_bytes() or 0)
            self.peak_bytes = max(0, peak - self.baseline_bytes)
        else:
            self.peak_bytes = max(0, _ru_maxrss_bytes() - self.baseline_bytes)
