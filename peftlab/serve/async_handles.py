"""The engine's request handles seen from asyncio: their tokens and results as one async stream.

A :class:`~peftlab.serve.requests.RequestHandle` blocks (``stream()``, ``result()``); the server's
event loop must not. One small thread per handle reads it and hands each event to the loop, so a
waiting request costs a parked thread, never a blocked loop or a worker of the shared thread pool.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence

from .requests import GenerationResult, RequestHandle, TokenEvent

Event = TokenEvent | GenerationResult


class HandleEvents:
    """The events of several handles, merged in arrival order as ``(index, event)`` pairs; each
    handle ends with its :class:`GenerationResult`, or its error is raised from the iteration.

    Create it inside the running event loop, after the requests were submitted.
    """

    def __init__(self, handles: Sequence[RequestHandle]) -> None:
        """Start one reader thread per handle."""
        self.handles = list(handles)
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, Event | BaseException]] = asyncio.Queue()
        for index, handle in enumerate(self.handles):
            threading.Thread(target=self._read, args=(index, handle), daemon=True,
                             name=f"peftlab-handle-{handle.request_id[:8]}").start()

    def _read(self, index: int, handle: RequestHandle) -> None:
        try:
            for event in handle.stream():
                self._put((index, event))
            self._put((index, handle.result()))
        except BaseException as err:  # noqa: BLE001 - handed to the loop, raised there
            self._put((index, err))

    def _put(self, item: tuple[int, Event | BaseException]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop has closed (server shut down): nobody is listening
            pass

    async def __aiter__(self) -> AsyncIterator[tuple[int, Event]]:
        """Yield ``(handle index, TokenEvent or GenerationResult)`` until every handle finished;
        raise the first error a handle reports."""
        open_handles = len(self.handles)
        while open_handles:
            index, item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, GenerationResult):
                open_handles -= 1
            yield index, item

    async def results(self) -> list[GenerationResult]:
        """Wait for every handle and return the results in handle order."""
        results: list[GenerationResult | None] = [None] * len(self.handles)
        async for index, item in self:
            if isinstance(item, GenerationResult):
                results[index] = item
        return [r for r in results if r is not None]

    def cancel(self) -> None:
        """Cancel every handle that has not finished (a client went away, or a sibling failed)."""
        for handle in self.handles:
            if not handle.done:
                handle.cancel()
