"""Each process's share of the data when several processes train together.

:class:`ShardSampler` applies ``torch.utils.data.DistributedSampler``'s rule (process r of W takes
positions r, r + W, r + 2W, ... of the epoch's order) to the order the run's own loader gives
(``make_loader(shuffle=True, seed=...)``: a ``RandomSampler`` on a seeded generator), instead of
drawing a new order. So the examples of global step k over W processes with b examples each are
the examples of step k of one process with W·b: with the same global batch, one process and W
processes see the same data at every step (exactly when the number of examples is a multiple of
W·b; otherwise the last step of an epoch differs, as below).

Training shares are padded (``pad=True``): the epoch's first positions are repeated so that every
process gets ⌈n/W⌉ examples and takes the same number of steps (DistributedSampler's rule; a
process with fewer batches would wait forever in the gradient all-reduce). Evaluation shares are
not padded (``pad=False``): every example counts once, and the processes with one batch fewer run
its forward again and throw it away (``train/distributed.py``), since under DDP and FSDP every
forward is collective.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler


class ShardSampler(Sampler[int]):
    """Process ``rank``'s share of each pass over ``base`` (see the module docstring)."""

    def __init__(self, base: Sampler[int], rank: int, world_size: int, pad: bool) -> None:
        """Take positions ``rank``, ``rank + world_size``, ... of every pass over ``base``;
        ``pad``: repeat the pass's first positions so every rank gets ⌈n/world_size⌉."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..world_size-1, got rank={rank}, world_size={world_size}")
        self.base = base
        self.rank = rank
        self.world_size = world_size
        self.pad = pad

    @property
    def generator(self) -> torch.Generator | None:
        """The generator that orders each pass (the base sampler's), for code that saves and restores
        the data position (``train/data_order.py``)."""
        return getattr(self.base, "generator", None)

    def _base_len(self) -> int:
        if not isinstance(self.base, Sized):
            raise TypeError(f"{type(self.base).__name__} has no length: a share needs the size of a pass")
        return len(self.base)

    def share_size(self, rank: int) -> int:
        """Examples process ``rank`` gets per pass."""
        n = self._base_len()
        if self.pad:
            return math.ceil(n / self.world_size)
        return len(range(rank, n, self.world_size))

    def __len__(self) -> int:
        """Examples this process gets per pass."""
        return self.share_size(self.rank)

    def __iter__(self) -> Iterator[int]:
        """This process's positions of one pass. The whole pass is drawn at the first ``next()``,
        as ``RandomSampler`` draws it, so the seeded generator advances exactly as it does for one
        process."""
        order = list(self.base)
        if self.pad and order:
            total = math.ceil(len(order) / self.world_size) * self.world_size
            while len(order) < total:
                order += order[: total - len(order)]
        yield from order[self.rank::self.world_size]


def _base_sampler(loader: DataLoader, generator: torch.Generator | None) -> Sampler[int]:
    sampler = loader.sampler
    if isinstance(sampler, RandomSampler):
        return RandomSampler(loader.dataset, replacement=sampler.replacement, num_samples=sampler.num_samples,
                             generator=generator)
    if isinstance(sampler, SequentialSampler):
        return SequentialSampler(loader.dataset)
    raise ValueError(f"cannot share out a loader whose sampler is {type(sampler).__name__}: several processes need a "
                     "DataLoader over a dataset with shuffle=True (a seeded generator) or shuffle=False, "
                     "as make_loader builds it")


def shard_loader(loader: DataLoader, rank: int, world_size: int, pad: bool) -> DataLoader:
    """A DataLoader over the same dataset, batch size and collate function as ``loader`` that gives
    process ``rank`` of ``world_size`` its share (:class:`ShardSampler`). The loader's generator is
    copied, so every process draws the same order as ``loader`` would (and ``loader`` itself is left
    as it was)."""
    if not isinstance(loader, DataLoader) or loader.batch_size is None:
        raise TypeError(f"several processes need a batched torch DataLoader, got {type(loader).__name__}")
    generator = None
    if loader.generator is not None:
        generator = torch.Generator()
        generator.set_state(loader.generator.get_state())
    sampler = ShardSampler(_base_sampler(loader, generator), rank, world_size, pad)
    if not pad and sampler.share_size(world_size - 1) == 0:
        raise ValueError(f"the evaluation set has {sampler._base_len()} examples, fewer than the {world_size} "
                         "processes: give every process at least one (a larger --eval-limit, or fewer processes)")
    # The loader's own generator too: a DataLoader draws its base seed from it before the sampler
    # runs, and one process's order depends on that draw.
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn,
                      generator=generator, num_workers=loader.num_workers, drop_last=loader.drop_last,
                      pin_memory=loader.pin_memory)


def batches_per_share(loader: DataLoader) -> list[int]:
    """Batches each process's share of ``loader`` (made by :func:`shard_loader`) holds, by rank."""
    sampler = loader.sampler
    if not isinstance(sampler, ShardSampler) or loader.batch_size is None:
        raise TypeError("batches_per_share needs a loader made by shard_loader")
    sizes = [sampler.share_size(r) for r in range(sampler.world_size)]
    if loader.drop_last:
        return [s // loader.batch_size for s in sizes]
    return [math.ceil(s / loader.batch_size) for s in sizes]
