"""Each process's share of the data (train/sharding.py): the run's own seeded order shared out as
DistributedSampler shares it, so W processes with b examples each see, step by step, the examples
one process sees with W·b."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

import pytest

from peftlab.train.sharding import ShardSampler, batches_per_share, shard_loader


def _loader(n: int, batch: int, shuffle: bool, seed: int = 3) -> DataLoader:
    """Batches of example indices (the dataset is range(n)), ordered as make_loader orders them."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(list(range(n)), batch_size=batch, shuffle=shuffle, generator=generator)


def _epochs(loader: DataLoader, epochs: int) -> list[list[int]]:
    return [batch.tolist() for _ in range(epochs) for batch in loader]


def test_one_process_share_is_the_loaders_own_order_epoch_after_epoch() -> None:
    own = _epochs(_loader(20, 4, shuffle=True), 3)
    shared = _epochs(shard_loader(_loader(20, 4, shuffle=True), rank=0, world_size=1, pad=True), 3)
    assert shared == own
    assert own[:5] != own[5:10]  # a new order each epoch, and the share follows it


def test_two_processes_together_take_the_global_batch_of_one_process() -> None:
    one = _epochs(_loader(32, 8, shuffle=True), 2)
    ranks = [_epochs(shard_loader(_loader(32, 4, shuffle=True), r, 2, pad=True), 2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one) == 8
    for step, batch in enumerate(one):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(batch)
        assert not set(ranks[0][step]) & set(ranks[1][step])


def test_training_shares_are_padded_to_equal_length_and_evaluation_shares_are_not() -> None:
    padded = [list(ShardSampler(range(10), r, 4, pad=True)) for r in range(4)]
    assert [len(s) for s in padded] == [3, 3, 3, 3]
    assert set().union(*map(set, padded)) == set(range(10))
    exact = [list(ShardSampler(range(10), r, 4, pad=False)) for r in range(4)]
    assert [len(s) for s in exact] == [3, 3, 2, 2]
    assert sorted(sum(exact, [])) == list(range(10))


def test_batches_per_share_of_an_uneven_eval_set() -> None:
    shares = [shard_loader(_loader(33, 8, shuffle=False), r, 2, pad=False) for r in range(2)]
    assert batches_per_share(shares[0]) == [3, 2]
    assert [len(list(s)) for s in shares] == [3, 2]
    assert sorted(i for s in shares for b in s for i in b.tolist()) == list(range(33))


def test_shard_loader_refuses_what_it_cannot_share() -> None:
    weighted = DataLoader(list(range(8)), batch_size=2, sampler=WeightedRandomSampler([1.0] * 8, 8))
    with pytest.raises(ValueError, match="WeightedRandomSampler"):
        shard_loader(weighted, 0, 2, pad=True)
    with pytest.raises(ValueError, match="evaluation set has 2 examples, fewer than the 3 processes"):
        shard_loader(_loader(2, 1, shuffle=False), 0, 3, pad=False)
    with pytest.raises(ValueError, match="rank must be in 0..world_size-1"):
        ShardSampler(range(4), 2, 2, pad=True)
