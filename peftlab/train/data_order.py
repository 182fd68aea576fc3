"""The stream of training batches, epoch after epoch, grouped for gradient accumulation, that
knows where it is and can start again there (what resuming a run needs of the data order)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

Batch = dict[str, torch.Tensor]


def loader_generator(loader: Any) -> torch.Generator | None:
    """The generator that orders ``loader``'s batches (a DataLoader's own, or its sampler's), or
    None when its order comes from torch's global generator (or involves no randomness)."""
    for source in (loader, getattr(loader, "sampler", None)):
        generator = getattr(source, "generator", None)
        if isinstance(generator, torch.Generator):
            return generator
    return None


class BatchStream:
    """Groups of ``group_size`` micro-batches from ``loader``, cycling over epochs; a short last
    group closes each epoch.

    Its :meth:`position` (epoch, batches taken from the current epoch, and the state of the
    generator that ordered that epoch, taken just before the epoch's iterator was made) is enough
    to rebuild the same stream in a new process with :meth:`seek`: the epoch's iterator is made
    again from the same generator state and the batches already used are drawn and dropped. A
    DataLoader with a ``generator`` (``make_loader(shuffle=True)``) keeps its own state; otherwise
    the global torch generator's state is recorded, since a DataLoader draws its seeds from it.
    """

    def __init__(self, loader: Iterable[Batch], group_size: int) -> None:
        """Stream ``loader`` in groups of ``group_size`` batches."""
        self.loader = loader
        self.group_size = group_size
        self.epoch = 0
        self.batches_into_epoch = 0
        self._epoch_start_state: torch.Tensor | None = None
        self._iterator: Iterator[Batch] | None = None

    def _order_state(self) -> torch.Tensor:
        generator = loader_generator(self.loader)
        return (generator.get_state() if generator is not None else torch.get_rng_state()).clone()

    def _start_epoch(self) -> None:
        self._epoch_start_state = self._order_state()
        self._iterator = iter(self.loader)
        self.batches_into_epoch = 0

    def next_group(self) -> list[Batch]:
        """The next group of micro-batches (fewer than ``group_size`` at the end of an epoch)."""
        group: list[Batch] = []
        while len(group) < self.group_size:
            if self._iterator is None:
                self._start_epoch()
            try:
                batch = next(self._iterator)  # type: ignore[arg-type]
            except StopIteration:
                if self.batches_into_epoch == 0:
                    raise ValueError("train_loader is empty") from None
                self._iterator = None
                self.epoch += 1
                if group:
                    return group
                continue
            group.append(batch)
            self.batches_into_epoch += 1
        return group

    def position(self) -> dict[str, Any]:
        """Where the stream is: ``{"epoch", "batches_into_epoch", "epoch_start_state"}``. Between
        epochs, the generator's state now, from which the next epoch will be ordered."""
        if self._iterator is None:
            return {"epoch": self.epoch, "batches_into_epoch": 0, "epoch_start_state": self._order_state()}
        return {"epoch": self.epoch, "batches_into_epoch": self.batches_into_epoch,
                "epoch_start_state": self._epoch_start_state}

    def seek(self, position: dict[str, Any]) -> None:
        """Continue from a :meth:`position` of a stream over the same loader. Changes the global
        torch generator when the loader has no generator of its own: restore the run's generators
        after this call."""
        self.epoch = int(position["epoch"])
        self.batches_into_epoch = 0
        self._iterator = None
        state = position.get("epoch_start_state")
        skip = int(position["batches_into_epoch"])
        if state is None:
            return
        generator = loader_generator(self.loader)
        if generator is not None:
            generator.set_state(state)
        else:
            torch.set_rng_state(state)
        if skip == 0:
            return
        self._start_epoch()
        for _ in range(skip):
            if next(self._iterator, None) is None:  # type: ignore[arg-type]
                raise ValueError(f"the saved data position is batch {skip} of epoch {self.epoch}, but an epoch "
                                 f"of this loader has only {self.batches_into_epoch} batches: not the same data")
            self.batches_into_epoch += 1
