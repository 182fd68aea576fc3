"""``bench/heap.py``: while ``live_tensor_rss`` is on, a freed tensor's memory leaves the RSS at
once, even after glibc's mmap threshold has risen above the tensor's size (then the tensor would
come from the heap and stay resident); the compare's peak, measured so, follows live tensors.

Each check runs in a fresh interpreter, as the compare job does: what glibc keeps resident depends
on the process's heap history, and a test process that has run hundreds of tests has a long one
(under pytest-xdist these checks failed in a worker for that reason)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc: Linux only")
MB = 2**20

PRELUDE = """
import json, torch
from peftlab.bench.heap import live_tensor_rss
from peftlab.bench.measure import measure_pair
from peftlab.train.memory import current_rss_bytes
MB = 2**20
def touched(mb):
    return torch.ones(mb * MB // 4)
"""


def run_fresh(body: str) -> dict:
    """Run ``body`` after PRELUDE in a new interpreter; it prints one JSON object, returned here."""
    code = PRELUDE + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_freed_tensor_leaves_the_rss_at_once():
    r = run_fresh("""
        with live_tensor_rss() as applied:
            big = touched(24)
            del big  # with glibc's own setting this would raise its threshold above 16 MB
            before = current_rss_bytes()
            t = touched(16)
            during = current_rss_bytes()
            del t
            after = current_rss_bytes()
        print(json.dumps({"applied": bool(applied), "before": before, "during": during, "after": after}))
    """)
    assert r["applied"]
    assert r["during"] - r["before"] > 15 * MB
    assert r["during"] - r["after"] > 15 * MB


def test_measure_pair_live_rss_peak_is_the_live_peak():
    """A step whose live tensors peak at 24 MB but that frees a 16 MB tensor under a kept small one:
    its peak is about 24 MB, and the method says how it was measured."""
    r = run_fresh("""
        def step():
            a = touched(16)
            keep = touched(1)
            del a
            b = touched(24)
            return keep.sum() + b[0]
        step()  # once unmeasured, as the compare job's untimed backward: one-time allocations first
        _, peaks, method = measure_pair({"one": step}, repeats=1, memory_rounds=2, live_rss=True)
        print(json.dumps({"peak": peaks["one"], "method": method}))
    """)
    assert r["method"].endswith("+live_rss")
    assert 24 <= r["peak"] < 24 + 8
