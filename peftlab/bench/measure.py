"""Timing, peak memory and fresh-subprocess isolation for the benchmark.

* :func:`timed` runs a callable ``1 + steps`` times and keeps the wall-clock and process-CPU seconds
  of the timed calls (the first is a warm-up); :func:`interleaved` times several callables round by
  round; :func:`measure_pair` measures competing training steps in one process, memory then time;
  :func:`median` summarises them.
* peak memory above the loaded model comes from :class:`peftlab.train.memory.PeakMemory`.
* :func:`run_isolated` runs one job in a fresh Python process (:mod:`peftlab.bench.worker`), so that
  allocator state and the memory high-water mark of one row never leak into the next.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

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


def interleaved(cases: dict[str, Callable[[], Callable[[], Any]]], steps: int, device: torch.device,
                warmup: int = 1) -> tuple[dict[str, dict[str, list[float]]], dict[str, Any]]:
    """Time every case round by round (``warmup`` untimed rounds, then ``steps`` timed ones).

    A case is a function that prepares a call untimed (copying a cache, say) and returns the call to
    time. Returns the times per case and each case's output of the last round."""
    times: dict[str, dict[str, list[float]]] = {k: {"wall": [], "cpu": []} for k in cases}
    outputs: dict[str, Any] = {}
    for rnd in range(warmup + steps):
        for key, prepare in cases.items():
            call = prepare()
            wall, cpu, outputs[key] = once(call, device)
            if rnd >= warmup:
                times[key]["wall"].append(wall)
                times[key]["cpu"].append(cpu)
    return times, outputs


def measure_pair(steps: dict[str, Callable[[], Any]], repeats: int, device: torch.device | str = "cpu",
                 memory_rounds: int = 2, live_rss: bool = False) -> tuple[dict[str, dict[str, list[float]]], dict[str, float], str]:
    """Peak memory, then time, of competing steps in one process (two libraries' training steps).

    Memory: each step under :class:`~peftlab.train.memory.PeakMemory` (freed heap handed back and the
    high-water mark reset before it), in alternating order, ``memory_rounds`` times; a step's peak is
    the largest growth above the memory in use before it (the first round creates optimizer state).
    With ``live_rss`` on CPU, the memory rounds run under :func:`~peftlab.bench.heap.live_tensor_rss`
    (the RSS follows live tensors; the method gets ``+live_rss``).
    Time: one untimed round, then ``repeats`` rounds of every step (:func:`interleaved`).
    Returns ``(times per step, peak MB per step, the memory method)``."""
    from peftlab.bench.heap import live_tensor_rss
    from peftlab.train.memory import PeakMemory

    names = list(steps)
    peaks = dict.fromkeys(names, 0.0)
    method = ""
    with live_tensor_rss() if live_rss and torch.device(device).type == "cpu" else nullcontext(False) as live:
        for rnd in range(memory_rounds):
            for name in names if rnd % 2 == 0 else names[::-1]:
                with PeakMemory(device) as memory:
                    steps[name]()
                peaks[name], method = max(peaks[name], memory.peak_bytes / MB), memory.method + ("+live_rss" if live else "")
    times, _ = interleaved({name: (lambda s=step: s) for name, step in steps.items()}, repeats, device)
    return times, peaks, method


def median(values: list[float]) -> float:
    """The median (0.0 for an empty list)."""
    return float(statistics.median(values)) if values else 0.0


# -- memory -----------------------------------------------------------------------------------------
# Peak memory is measured by :class:`peftlab.train.memory.PeakMemory`, the trainer's own meter.
def touch_parameters(model: torch.nn.Module) -> None:
    """Read every parameter and buffer once. Weights loaded from safetensors are memory-mapped and
    become resident only when first read; touching them makes them part of the baseline."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.numel():
                t.detach().reshape(-1)[:: max(1, 4096 // t.element_size())].sum()


# -- isolation --------------------------------------------------------------------------------------
class WorkerError(RuntimeError):
    """A benchmark subprocess failed; the message holds the tail of its stderr."""


def run_isolated(job: dict[str, Any], timeout: float | None = None, worker: str = "peftlab.bench.worker") -> dict[str, Any]:
    """Run ``job`` in a fresh ``python -m <worker>`` process (default :mod:`peftlab.bench.worker`; a
    worker module takes ``JOB.json RESULT.json``) and return its result.

    The job travels as a JSON file, the result comes back as another (stdout and stderr stay free
    for the libraries' own chatter)."""
    with tempfile.TemporaryDirectory(prefix="peftlab-bench-") as tmp:
        job_file, out_file = Path(tmp, "job.json"), Path(tmp, "result.json")
        job_file.write_text(json.dumps(job))
        threads = str(job.get("threads", 1))
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
        proc = subprocess.run(
            [sys.executable, "-m", worker, str(job_file), str(out_file)],
            env=env, capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0 or not out_file.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise WorkerError(f"benchmark job {job.get('kind')}/{job.get('row', '')} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out_file.read_text())
