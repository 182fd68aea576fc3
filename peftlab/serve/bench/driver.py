"""Replaying a trace against a system (the engine or a baseline) in real time, and what came of it.

The driver is an open-loop client: each request is submitted at its arrival instant whatever the
system is doing, so a slow system builds a queue (and its latencies show it) instead of slowing the
arrivals. A request is *failed* when ``submit`` refuses it (a full queue, say) or its result is an
error; failed requests are counted, never retried.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from tqdm import tqdm

from peftlab.serve.requests import GenerationRequest, RequestHandle
from peftlab.serve.bench.workload import TraceRequest
from peftlab.train.memory import current_rss_bytes

MB = 2**20


@dataclass
class RequestRecord:
    """One request's outcome; latencies are seconds from its arrival."""

    arrival_s: float
    adapter: str | None
    prompt_tokens: int
    max_tokens: int
    ok: bool = False
    error: str = ""
    first_token_s: float | None = None
    total_s: float | None = None
    completion_tokens: int = 0
    deadline_missed: bool = False


class MemorySampler:
    """RSS of this process every ``interval`` seconds in a background thread: ``[(seconds, MiB)]``."""

    def __init__(self, interval: float = 1.0) -> None:
        """Not started."""
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._t0 = 0.0

    def _sample(self) -> None:
        rss = current_rss_bytes()
        if rss is not None:
            self.samples.append((time.monotonic() - self._t0, rss / MB))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "MemorySampler":
        self._t0 = time.monotonic()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def run_trace(system: Any, trace: Sequence[TraceRequest], adapter_names: Sequence[str], slo_s: float,
              timeout_s: float = 3600.0, progress: bool = False) -> tuple[list[RequestRecord], float]:
    """Submit each request of ``trace`` at its arrival instant (greedy decoding, deadline =
    arrival + ``slo_s``), collecting results as they finish (so a long soak holds only the requests
    in flight, not every answer so far), then the rest.

    Returns the records (in trace order) and the span in seconds from the first arrival to the last
    completion (or refusal)."""
    records = [RequestRecord(r.arrival_s, None if r.adapter is None else adapter_names[r.adapter], len(r.prompt_ids),
                             r.max_tokens) for r in trace]
    pending: list[tuple[int, float, RequestHandle]] = []
    start = time.monotonic()
    end = start
    for i, item in enumerate(tqdm(trace, desc="requests", unit="req", disable=not progress, leave=False)):
        delay = start + item.arrival_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        request = GenerationRequest(prompt_ids=list(item.prompt_ids), adapter=records[i].adapter, max_tokens=item.max_tokens,
                                    temperature=0.0, deadline=start + item.arrival_s + slo_s)
        submitted = time.monotonic()
        try:
            pending.append((i, submitted - start - item.arrival_s, system.submit(request)))
        except Exception as err:  # noqa: BLE001 - a refused request is a failed one, counted by type
            records[i].error = type(err).__name__
            end = max(end, submitted)
        finished = [p for p in pending if p[2].done]
        if finished:
            pending = [p for p in pending if not p[2].done]
            end = max([end, *(_collect(records[i], lag, h, start, slo_s, 0.0) for i, lag, h in finished)])
    deadline = time.monotonic() + timeout_s
    for i, lag, handle in pending:
        end = max(end, _collect(records[i], lag, handle, start, slo_s, max(0.0, deadline - time.monotonic())))
    return records, end - start


def _collect(record: RequestRecord, lag: float, handle: RequestHandle, start: float, slo_s: float, timeout: float) -> float:
    """Fill ``record`` from the handle's result (waiting up to ``timeout``); returns the instant the
    request ended (``start`` if it failed)."""
    try:
        result = handle.result(timeout=timeout)
    except Exception as err:  # noqa: BLE001 - counted as failed, with its type
        record.error = type(err).__name__
        handle.cancel()
        return start
    record.ok = True
    record.first_token_s = lag + result.first_token_s
    record.total_s = lag + result.total_s
    record.completion_tokens = result.completion_tokens
    record.deadline_missed = record.total_s > slo_s
    return start + record.arrival_s + record.total_s


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics; None if empty."""
    if not values:
        return None
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def summarize(records: Sequence[RequestRecord], span_s: float) -> dict[str, Any]:
    """Throughput (generated tokens/s and finished requests/s over the span), p50/p90/p99 of the
    first-token and total latencies, deadline-miss rate (of finished requests) and the failures."""
    done = [r for r in records if r.ok]
    tokens = sum(r.completion_tokens for r in done)
    out: dict[str, Any] = {
        "requests": len(records), "ok": len(done), "failed": len(records) - len(done),
        "failures": dict(Counter(r.error for r in records if not r.ok)),
        "span_s": span_s, "generated_tokens": tokens,
        "tokens_per_s": tokens / span_s if span_s > 0 else 0.0,
        "requests_per_s": len(done) / span_s if span_s > 0 else 0.0,
        "deadline_miss_rate": sum(r.deadline_missed for r in done) / len(done) if done else None,
    }
    for key in ("first_token_s", "total_s"):
        values = [getattr(r, key) for r in done]
        for q in (50, 90, 99):
            out[f"{key.removesuffix('_s')}_p{q}_s"] = percentile(values, q)
    return out


def records_as_dicts(records: Sequence[RequestRecord]) -> list[dict[str, Any]]:
    """The records as JSON-able dicts."""
    return [asdict(r) for r in records]
