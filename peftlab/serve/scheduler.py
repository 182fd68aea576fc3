"""Which waiting requests join the batch, and how new prompts are grouped for their prefill.

* A bounded queue: at ``max_queue`` waiting requests, :meth:`RequestQueue.push` raises
  :class:`QueueFullError` with a ``retry_after`` estimated from the recent completion rate.
* Earliest deadline first (seed 002 §6.1.4's deadline-miss rate): waiting requests are taken in
  order of deadline; a request without one counts as due ``default_slack_s`` after it arrived, so
  requests with deadlines go first without starving the others. A request whose adapter is not on
  the device yet is passed over (not blocking those behind it) until its adapter is ready.
* Coordinated batching (PetS, seed 002 §6.2): the prompts admitted in one step are sorted by length
  and cut into groups whose lengths are close (:func:`length_groups`), so a prefill pads little.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import QueueFullError


@dataclass(eq=False)
class Waiting:
    """A request in the queue, with what scheduling needs to know."""

    request: Any
    handle: Any
    entry: Any  # the adapter's cache entry, or None for the base model
    arrived: float
    due: float  # its deadline, or arrival + the default slack
    prompt_len: int
    extra: dict = field(default_factory=dict)


class RequestQueue:
    """The waiting requests (thread-safe), taken earliest deadline first."""

    def __init__(self, max_queue: int, default_slack_s: float = 60.0):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.max_queue = max_queue
        self.default_slack_s = default_slack_s
        self._items: list[Waiting] = []
        self._lock = threading.Lock()
        self._done_times: deque[float] = deque(maxlen=64)

    def __len__(self) -> int:
        return len(self._items)

    def push(self, request: Any, handle: Any, entry: Any, prompt_len: int) -> Waiting:
        """Queue a request; :class:`QueueFullError` when ``max_queue`` are waiting."""
        now = time.monotonic()
        due = request.deadline if request.deadline is not None else now + self.default_slack_s
        item = Waiting(request, handle, entry, now, due, prompt_len)
        with self._lock:
            if len(self._items) >= self.max_queue:
                raise QueueFullError(
                    f"the request queue is full ({self.max_queue} waiting requests, max_queue); retry later",
                    retry_after=self.retry_after())
            self._items.append(item)
        return item

    def retry_after(self) -> float:
        """Seconds until a place is likely free: the recent time between completions times the queue
        length, within [0.1, 60] (1 s before any request completed)."""
        times = list(self._done_times)
        if len(times) < 2 or times[-1] <= times[0]:
            return 1.0
        per_request = (times[-1] - times[0]) / (len(times) - 1)
        return float(min(60.0, max(0.1, per_request * max(1, len(self._items)))))

    def completed(self) -> None:
        """Record one completion (for :meth:`retry_after`)."""
        self._done_times.append(time.monotonic())

    def take(self, limit: int, admit: Callable[[Waiting], bool], token_budget: int) -> list[Waiting]:
        """Remove and return up to ``limit`` requests, earliest due first, for which ``admit`` says
        yes (it may reserve resources; a no leaves the request waiting); prompts stop being taken
        once ``token_budget`` prompt tokens are (the first one is taken whatever its length)."""
        with self._lock:
            order = sorted(self._items, key=lambda w: (w.due, w.arrived))
        taken: list[Waiting] = []
        tokens = 0
        for item in order:
            if len(taken) >= limit:
                break
            if taken and tokens + item.prompt_len > token_budget:
                continue
            if item.handle.cancelled or admit(item):
                taken.append(item)
                tokens += item.prompt_len
        if taken:
            chosen = set(map(id, taken))
            with self._lock:
                self._items = [w for w in self._items if id(w) not in chosen]
        return taken

    def remove_if(self, predicate: Callable[[Waiting], bool]) -> list[Waiting]:
        """Remove and return the waiting requests for which ``predicate`` is true."""
        with self._lock:
            out = [w for w in self._items if predicate(w)]
            self._items = [w for w in self._items if not predicate(w)]
        return out

    def snapshot(self) -> list[Waiting]:
        """The waiting requests now (a copy)."""
        with self._lock:
            return list(self._items)


def length_groups(items: list[Any], ratio: float = 1.25, slack: int = 8,
                  length: Callable[[Any], int] = lambda w: w.prompt_len) -> list[list[Any]]:
    """PetS's coordinated batching: sort by prompt ``length`` and cut into groups in which the
    longest prompt is at most ``ratio`` × the shortest + ``slack`` tokens, so padding stays small."""
    groups: list[list[Any]] = []
    for item in sorted(items, key=length):
        if groups and length(item) <= length(groups[-1][0]) * ratio + slack:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def unpadded_where_needed(groups: list[list[Waiting]], needs: Callable[[Waiting], bool]) -> list[list[Waiting]]:
    """``groups`` (each sorted by prompt length) cut so that no item for which ``needs`` holds is
    padded: such an item ends its group unless the next ones are as long as it is. For adapters
    whose gates average over a call's positions (UniPELT), which padding would change."""
    out: list[list[Waiting]] = []
    for group in groups:
        current: list[Waiting] = []
        for k, item in enumerate(group):
            current.append(item)
            longer_next = k + 1 < len(group) and group[k + 1].prompt_len > item.prompt_len
            if longer_next and any(needs(w) and w.prompt_len == item.prompt_len for w in current):
                out.append(current)
                current = []
        out.append(current)
    return out
