"""Make a CPU process's resident memory follow its live tensors, for peak-memory comparisons.

On CPU, :class:`~peftlab.train.memory.PeakMemory` measures the peak RSS. glibc serves an allocation
from ``mmap`` (handed back to the OS on free) only above its mmap threshold, and that threshold
rises to the size of every large block freed, up to 32 MiB: after a few steps, tensors of a
training step come from the heap, where a freed tensor's pages stay resident wherever a later,
longer-lived allocation sits above them. The RSS peak then depends on the order and sizes of
short-lived allocations, not only on what is alive at once. Measured on MiniLM's training step
(``bench methods --compare-peft``), that left ±10 MB between repeated steps of the same library, and
charged the process's one-time first-backward allocations to whichever library stepped first.

:func:`live_tensor_rss` fixes the thresholds at 128 KiB (glibc's starting value) while its block
runs: every tensor above that size is mapped and unmapped on its own, so the RSS peak is the peak
of live tensors plus the small-object heap, as the CUDA allocator's peak is on a GPU. Both
thresholds are then set to glibc's dynamic maxima (mmap 32 MiB, trim 64 MiB) rather than their
previous, unreadable values; they stay fixed (``mallopt`` turns glibc's adjustment off).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from contextlib import contextmanager
from typing import Iterator

# <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
EXACT_BYTES = 128 * 1024
AFTER_MMAP_BYTES, AFTER_TRIM_BYTES = 32 * 1024 * 1024, 64 * 1024 * 1024


def _mallopt(param: int, value: int) -> bool:
    """glibc ``mallopt(param, value)``; False where there is no glibc or it refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)))
    except (OSError, AttributeError):
        return False


@contextmanager
def live_tensor_rss() -> Iterator[bool]:
    """While the block runs, blocks above 128 KiB are mapped apart and handed back on free (module
    docstring); yields whether glibc accepted the setting (False elsewhere: measure as usual)."""
    applied = _mallopt(_M_MMAP_THRESHOLD, EXACT_BYTES) and _mallopt(_M_TRIM_THRESHOLD, EXACT_BYTES)
    try:
        yield applied
    finally:
        if applied:
            _mallopt(_M_MMAP_THRESHOLD, AFTER_MMAP_BYTES)
            _mallopt(_M_TRIM_THRESHOLD, AFTER_TRIM_BYTES)
