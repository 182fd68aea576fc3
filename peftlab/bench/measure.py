"""Timing, peak memory and fresh-subprocess isolation for the benchmark.

* :func:`timed` runs a callable ``1 + steps`` times and keeps the wall-clock and process-CPU seconds
  of the timed calls (the first is a warm-up); :func:`median` summarises them.
* :class:`PeakMemory` measures the peak memory above a baseline taken right after the model was
  loaded: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the kernel's resident-set high-water
  mark ``VmHWM``, reset by writing ``5`` to ``/proc/self/clear_refs`` (Linux >= 4.0), or, where that is
  not permitted, ``VmRSS`` sampled every 10 ms by a thread.
* :func:`run_isolated` runs one job in a fresh Python process (:mod:`peftlab.bench.worker`), so that
  allocator state and the memory high-water mark of one row never leak into the next.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
MB = 1024 * 1024


# -- time -------------------------------------------------------------------------------------------
def sync(device: torch.device | str) -> None:
    """Wait for queued kernels on ``device`` (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], steps: int, device: torch.device | str = "cpu", warmup: int = 1) -> dict[str, list[float]]:
    """Call ``fn`` ``warmup`` times untimed, then ``steps`` times timed.

    Returns ``{"wall": [...], "cpu": [...]}``: seconds per timed call, wall clock and the CPU time of
    this process (all threads; less sensitive than wall time to other processes on the machine)."""
    for _ in range(warmup):
        fn()
    sync(device)
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall": wall, "cpu": cpu}


def once(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, float, Any]:
    """``(wall seconds, cpu seconds, result)`` of one call of ``fn``."""
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, out


def median(values: list[float]) -> float:
    """The median (0.0 for an empty list)."""
    return float(statistics.median(values)) if values else 0.0


# -- memory -----------------------------------------------------------------------------------------
def status_kib(field: str) -> int | None:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``...) in KiB, or None where unreadable."""
    try:
        match = re.search(rf"^{field}:\s+(\d+)\s*kB", _STATUS.read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def trim_heap() -> None:
    """Collect garbage and return free heap pages to the OS (glibc ``malloc_trim``), so that memory
    freed earlier and reused later shows up as growth of the resident set."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current RSS; True only if the reset visibly worked."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    hwm, rss = status_kib("VmHWM"), status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm - rss < 4096


def touch_parameters(model: torch.nn.Module) -> None:
    """Read every parameter and buffer once. Weights loaded from safetensors are memory-mapped and
    become resident only when first read; touching them makes them part of the baseline."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.numel():
                t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].sum()


class PeakMemory:
    """Peak memory above the baseline at construction time (call it right after loading the model).

    ``start()`` begins tracking, ``stop()`` returns the peak in bytes above the baseline; ``method``
    says how it was measured (``cuda_max_memory_allocated``, ``vmhwm`` or ``rss_sampling``).
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.01):
        self.device = torch.device(device)
        self.interval = interval
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._peak_kib = 0
        if self.device.type == "cuda":
            sync(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            trim_heap()
            self.baseline = (status_kib("VmRSS") or 0) * 1024

    def start(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda_max_memory_allocated"
        elif reset_hwm():
            self.method = "vmhwm"
        else:
            self.method = "rss_sampling"
            self._peak_kib = status_kib("VmRSS") or 0
            self._thread = threading.Thread(target=self._sample, name="bench-peak-rss", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak_kib = max(self._peak_kib, status_kib("VmRSS") or 0)

    def stop(self) -> int:
        if self.method == "cuda_max_memory_allocated":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "vmhwm":
            peak = (status_kib("VmHWM") or 0) * 1024
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            peak = max(self._peak_kib, status_kib("VmRSS") or 0) * 1024
        return max(0, int(peak) - int(self.baseline))


# -- isolation --------------------------------------------------------------------------------------
class WorkerError(RuntimeError):
    """A benchmark subprocess failed; the message holds the tail of its stderr."""


def run_isolated(job: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run ``job`` in a fresh ``python -m peftlab.bench.worker`` process and return its result.

    The job travels as a JSON file, the result comes back as another (stdout and stderr stay free
    for the libraries' own chatter)."""
    with tempfile.TemporaryDirectory(prefix="peftlab-bench-") as tmp:
        job_file, out_file = Path(tmp, "job.json"), Path(tmp, "result.json")
        job_file.write_text(json.dumps(job))
        threads = str(job.get("threads", 1))
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
        proc = subprocess.run(
            [sys.executable, "-m", "peftlab.bench.worker", str(job_file), str(out_file)],
            env=env, capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0 or not out_file.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise WorkerError(f"benchmark job {job.get('kind')}/{job.get('row', '')} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out_file.read_text())
