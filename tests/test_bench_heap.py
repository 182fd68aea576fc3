"""``bench/heap.py``: while ``live_tensor_rss`` is on, a freed tensor's memory leaves the RSS at
once, even after glibc's mmap threshold has risen above the tensor's size (then the tensor would
come from the heap and stay resident); the compare's peak, measured so, follows live tensors."""

from __future__ import annotations

import sys

import pytest
import torch

from peftlab.bench.heap import live_tensor_rss
from peftlab.bench.measure import measure_pair
from peftlab.train.memory import current_rss_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc: Linux only")
MB = 2**20


def touched(mb: int) -> torch.Tensor:
    return torch.ones(mb * MB // 4)


def test_a_freed_tensor_leaves_the_rss_at_once():
    with live_tensor_rss() as applied:
        assert applied
        big = touched(24)
        del big  # with glibc's own setting this would raise its threshold above 16 MB
        before = current_rss_bytes()
        t = touched(16)
        during = current_rss_bytes()
        del t
        after = current_rss_bytes()
    assert during - before > 15 * MB
    assert during - after > 15 * MB


def test_measure_pair_live_rss_peak_is_the_live_peak():
    """A step whose live tensors peak at 24 MB but that frees a 16 MB tensor under a kept small one:
    its peak is about 24 MB, and the method says how it was measured."""
    def step():
        a = touched(16)
        keep = touched(1)
        del a
        b = touched(24)
        return keep.sum() + b[0]

    _, peaks, method = measure_pair({"one": step}, repeats=1, memory_rounds=2, live_rss=True)
    assert method.endswith("+live_rss")
    assert 24 <= peaks["one"] < 24 + 8
