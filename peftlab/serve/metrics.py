"""``GET /metrics``: the engine's counters and the server's own, in Prometheus' text format (0.0.4).

From the engine (:meth:`~peftlab.serve.engine.Engine.stats`): queue length, running requests, batch
size, tokens/s, finished requests, adapter-cache hits and misses; every other number it reports is
exported too, as ``peftlab_engine_<key>`` (a dict of numbers becomes one metric with a ``key``
label). From the server: HTTP requests by route and status, prompt and generated tokens, and
histograms of the time to the first token and of the whole request.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any

#: Known engine stats: key -> (metric name, type, help).
ENGINE_METRICS: dict[str, tuple[str, str, str]] = {
    "queue_length": ("peftlab_queue_length", "gauge", "Requests waiting for a place in the batch."),
    "running": ("peftlab_running_requests", "gauge", "Requests in the decode batch."),
    "batch_size": ("peftlab_batch_size", "gauge", "Rows of the last decode step."),
    "tokens_per_s": ("peftlab_tokens_per_second", "gauge", "Generated tokens per second, recent average."),
    "requests_done": ("peftlab_requests_done_total", "counter", "Requests the engine finished."),
    "cache_hits": ("peftlab_adapter_cache_hits_total", "counter", "Adapter lookups served from the compute device."),
    "cache_misses": ("peftlab_adapter_cache_misses_total", "counter", "Adapter lookups read back from disk."),
    "host_hits": ("peftlab_adapter_host_hits_total", "counter", "Adapter lookups served by a move from host memory."),
    "requests_failed": ("peftlab_requests_failed_total", "counter", "Requests the engine failed."),
    "requests_cancelled": ("peftlab_requests_cancelled_total", "counter",
                           "Requests cancelled before they finished (e.g. a streaming client went away)."),
    "deadline_missed": ("peftlab_deadline_missed_total", "counter", "Requests finished after their deadline."),
    "tokens_generated": ("peftlab_engine_tokens_generated_total", "counter", "Tokens the engine generated."),
    "steps": ("peftlab_decode_steps_total", "counter", "Decode steps run (fused or not)."),
    "prefill_calls": ("peftlab_prefill_calls_total", "counter", "Prefill calls run (a fused call with new prompts counts as one)."),
    "fused_calls": ("peftlab_fused_calls_total", "counter", "Fused calls run (decode and prefill in one packed call)."),
}
#: Upper bounds (seconds) of the latency histograms' buckets.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count (not thread-safe by itself)."""

    def __init__(self, buckets: tuple[float, ...] = BUCKETS) -> None:
        """Empty, with the given upper bounds (``+Inf`` is added)."""
        self.bounds = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.sum += value
        for i, bound in enumerate((*self.bounds, math.inf)):
            if value <= bound:
                self.counts[i] += 1
                break

    def lines(self, name: str) -> list[str]:
        """The ``_bucket``, ``_sum`` and ``_count`` sample lines."""
        out, running = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{"+Inf" if bound == math.inf else f"{bound:g}"}"}} {running}')
        return [*out, f"{name}_sum {self.sum:.6f}", f"{name}_count {running}"]


class ServerMetrics:
    """The HTTP server's own counters, updated from request handlers (thread-safe)."""

    def __init__(self) -> None:
        """All counters at zero."""
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.first_token = Histogram()
        self.total = Histogram()

    def count_request(self, route: str, status: int) -> None:
        """One HTTP request to ``route`` answered with ``status``."""
        with self._lock:
            self.requests[(route, status)] += 1

    def count_generation(self, prompt_tokens: int, completion_tokens: int, first_token_s: float, total_s: float) -> None:
        """One finished generation (a choice): its tokens and its latencies."""
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.first_token.observe(first_token_s)
            self.total.observe(total_s)

    def lines(self) -> list[str]:
        """The server's metric families in text format."""
        with self._lock:
            out = ["# HELP peftlab_http_requests_total HTTP requests by route and status.",
                   "# TYPE peftlab_http_requests_total counter"]
            out += [f'peftlab_http_requests_total{{route="{_escape(route)}",status="{status}"}} {n}'
                    for (route, status), n in sorted(self.requests.items())]
            for name, value, help_text in (("peftlab_prompt_tokens_total", self.prompt_tokens, "Prompt tokens of finished generations."),
                                           ("peftlab_generated_tokens_total", self.completion_tokens, "Tokens generated for finished generations.")):
                out += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
            for name, hist, help_text in (("peftlab_first_token_seconds", self.first_token, "Time from submission to the first token."),
                                          ("peftlab_request_seconds", self.total, "Time from submission to the last token.")):
                out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram", *hist.lines(name)]
            return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _sample(name: str, value: float, labels: str = "") -> str:
    text = str(int(value)) if value.is_integer() else f"{value:.6g}"
    return f"{name}{labels} {text}"


def engine_lines(stats: Mapping[str, Any]) -> list[str]:
    """The engine's stats as metric families: the known ones under their names, every other number
    as ``peftlab_engine_<key>`` (gauge), a dict of numbers as one metric labelled by ``key``."""
    out: list[str] = []
    for key, value in stats.items():
        if key in ENGINE_METRICS:
            name, kind, help_text = ENGINE_METRICS[key]
        else:
            name, kind, help_text = "peftlab_engine_" + re.sub(r"[^a-zA-Z0-9_]", "_", key), "gauge", f"Engine stat {key!r}."
        if isinstance(value, Mapping):
            numbers = {k: _number(v) for k, v in value.items()}
            samples = [_sample(name, v, f'{{key="{_escape(str(k))}"}}') for k, v in numbers.items() if v is not None]
        else:
            samples = [] if (number := _number(value)) is None else [_sample(name, number)]
        if samples:
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]
    return out


def render(stats: Mapping[str, Any], server: ServerMetrics, adapters: int) -> str:
    """The whole ``/metrics`` page: engine stats, registered adapters and the server's counters."""
    lines = [*engine_lines(stats), "# HELP peftlab_adapters_registered Adapters the server can route to.",
             "# TYPE peftlab_adapters_registered gauge", f"peftlab_adapters_registered {adapters}", *server.lines()]
    return "\n".join(lines) + "\n"
