"""``peftlab split serve`` started in a process of its own (for tests, benchmarks and scripts)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator

from peftlab.train.split.backbone import SplitError

_READY = re.compile(r"listening on http://([^\s:]+):(\d+)")


@contextlib.contextmanager
def server_process(model: str, device: str = "cpu", preload: str | None = None, threads: int | None = None,
                   num_labels: int | None = None) -> Iterator[str]:
    """Start ``python -m peftlab split serve --model MODEL --port 0`` and yield its ``HOST:PORT`` once it
    listens; the process is terminated on exit. ``threads`` sets its torch threads (OMP_NUM_THREADS)."""
    command = [sys.executable, "-m", "peftlab", "split", "serve", "--model", model, "--port", "0", "--device", device]
    if preload:
        command += ["--preload", preload] + (["--num-labels", str(num_labels)] if num_labels else [])
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    # stderr to a file, not a pipe: nobody reads it while the server runs, and a full pipe would block it.
    errors = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, env=env)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        ready = _READY.search(line)
        if ready is None:
            proc.kill()
            proc.wait(timeout=30)
            errors.seek(0)
            raise SplitError(f"peftlab split serve did not start: {line.strip() or errors.read()[-2000:].strip()}")
        yield f"{ready.group(1)}:{ready.group(2)}"
    finally:
        errors.close()
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
