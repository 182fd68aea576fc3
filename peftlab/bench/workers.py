"""A pool of worker processes for ``peftlab bench methods``: each worker is ``python -m
peftlab.bench.workers`` and runs jobs one after another (:func:`peftlab.bench.standard_run.run_one`).

Persistent workers pay the imports (torch, transformers, peftlab) once and then run many jobs;
runs stay independent because each builds a fresh model and seeds every generator from its own
seed, and peak memory is measured from a baseline taken at the start of each run's training (after
freed heap is handed back to the OS). With ``fresh=True`` a worker exits after one job and a new
one takes the next, so every run has a process of its own (no allocator state or memory
high-water mark carried over), at the price of the imports per run.

Protocol: one JSON job per line on the worker's stdin, one JSON record per line on a private
copy of its original stdout; whatever the libraries print goes to the worker's log file. A worker
that dies or overruns ``timeout`` is killed and replaced, and its job gets a ``failed`` record
naming the exit status or the timeout and the tail of the log: no run is ever lost.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

Record = dict[str, Any]
Job = dict[str, Any]


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class _Worker:
    proc: subprocess.Popen
    log: Path
    log_file: IO[bytes]
    slot: int
    job: Job | None = None
    started: float = 0.0
    done: int = 0
    buffer: bytes = field(default=b"")


class WorkerPool:
    """``size`` worker processes with ``threads`` torch threads each (0: torch's default)."""

    def __init__(self, size: int, log_dir: Path, threads: int = 1, fresh: bool = False,
                 timeout: float | None = None) -> None:
        """Prepare the pool; workers start when :meth:`run` needs them. Logs go to ``log_dir``."""
        if size < 1:
            raise ValueError(f"a pool needs at least one worker, got {size}")
        self.size, self.threads, self.fresh, self.timeout = size, threads, fresh, timeout
        self.log_dir = Path(log_dir)
        self._free = list(range(1, size + 1))  # one log per slot; a replacement worker appends to it

    def _env(self) -> dict[str, str]:
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1"}
        if self.threads:
            env.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
        return env

    def _start(self) -> _Worker:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        slot = self._free.pop(0)
        log = self.log_dir / f"worker-{slot}.log"
        log_file = open(log, "ab")  # noqa: SIM115 - closed in _stop
        cmd = [sys.executable, "-m", "peftlab.bench.workers"] + (["--max-jobs", "1"] if self.fresh else [])
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file,
                                env=self._env())
        return _Worker(proc, log, log_file, slot)

    def _stop(self, worker: _Worker, kill: bool = False) -> None:
        try:
            if worker.proc.stdin:
                worker.proc.stdin.close()
        except OSError:
            pass
        if kill:
            worker.proc.kill()
        try:
            worker.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            worker.proc.kill()
            worker.proc.wait()
        worker.log_file.close()
        self._free = sorted([*self._free, worker.slot])

    @staticmethod
    def _send(worker: _Worker, job: Job) -> None:
        worker.job, worker.started = job, time.monotonic()
        assert worker.proc.stdin is not None
        worker.proc.stdin.write((json.dumps(job) + "\n").encode())
        worker.proc.stdin.flush()

    def _lost(self, worker: _Worker, why: str) -> Record:
        job = worker.job or {}
        tail = _log_tail(worker.log)
        return {"config": job.get("method"), "model": job.get("model"), "task": (job.get("task") or {}).get("name"),
                "seed": job.get("seed"), "budget": job.get("budget"), "status": "failed",
                "error": f"{why} (worker log {worker.log.name}){': ' + tail.splitlines()[-1] if tail else ''}",
                "traceback": tail, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}

    def run(self, jobs: Iterable[Job], on_result: Callable[[Job, Record], None]) -> None:
        """Run every job, calling ``on_result(job, record)`` in this process as each finishes."""
        queue = list(jobs)
        queue.reverse()
        sel = selectors.DefaultSelector()
        workers: list[_Worker] = []

        def assign(worker: _Worker) -> None:
            if queue:
                self._send(worker, queue.pop())

        def replace(worker: _Worker, kill: bool) -> None:
            sel.unregister(worker.proc.stdout)
            workers.remove(worker)
            self._stop(worker, kill=kill)
            if queue:
                fresh = self._start()
                workers.append(fresh)
                sel.register(fresh.proc.stdout, selectors.EVENT_READ, fresh)
                assign(fresh)

        try:
            for _ in range(min(self.size, len(queue))):
                worker = self._start()
                workers.append(worker)
                sel.register(worker.proc.stdout, selectors.EVENT_READ, worker)
                assign(worker)
            while any(w.job is not None for w in workers):
                wait = None
                if self.timeout:
                    now = time.monotonic()
                    wait = max(0.0, min(w.started + self.timeout - now for w in workers if w.job is not None))
                for key, _ in sel.select(timeout=wait):
                    worker = key.data
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:  # the worker died
                        code = worker.proc.wait()
                        if worker.job is not None:
                            on_result(worker.job, self._lost(worker, f"worker exited with status {code}"))
                        worker.job = None
                        replace(worker, kill=False)
                        continue
                    worker.buffer += chunk
                    while b"\n" in worker.buffer and worker.job is not None:
                        line, worker.buffer = worker.buffer.split(b"\n", 1)
                        job, worker.job = worker.job, None
                        worker.done += 1
                        on_result(job, json.loads(line))
                        if self.fresh:
                            replace(worker, kill=False)
                        else:
                            assign(worker)
                if self.timeout:
                    now = time.monotonic()
                    for worker in [w for w in workers if w.job is not None and now - w.started > self.timeout]:
                        on_result(worker.job, self._lost(worker, f"timed out after {self.timeout:.0f} s"))
                        worker.job = None
                        replace(worker, kill=True)
        finally:
            for worker in list(workers):
                self._stop(worker, kill=worker.job is not None)
            sel.close()


def main(argv: list[str]) -> int:
    """Worker loop: read jobs from stdin until it closes (or ``--max-jobs N`` are done), write
    each record as one line to the original stdout; library output goes to stderr (the log)."""
    max_jobs = int(argv[argv.index("--max-jobs") + 1]) if "--max-jobs" in argv else None
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints of the libraries go to the log, not into the protocol
    sys.stdout = sys.stderr
    from peftlab.bench.standard_run import run_one

    done = 0
    for line in sys.stdin:
        if not line.strip():
            continue
        record = run_one(json.loads(line))
        proto.write(json.dumps(record) + "\n")
        proto.flush()
        done += 1
        if max_jobs is not None and done >= max_jobs:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
