"""Joint batches of a multi-adapter run: rows cut into forward passes in order, and the parts of a pass
re-padded to a common length on the tokenizer's side (``peftlab.train.multi_batch``)."""

from __future__ import annotations

import pytest
import torch

from peftlab.train.multi_batch import join_inputs, split_passes


def _batch(rows: int, length: int, first: int, pad: int = 0, left: bool = False) -> dict[str, torch.Tensor]:
    """``rows`` rows of ids first, first+1, ... with the last row one token shorter (padded on the
    right, or on the left)."""
    ids = torch.arange(first, first + rows * length).reshape(rows, length)
    mask = torch.ones(rows, length, dtype=torch.long)
    column = 0 if left else -1
    ids[-1, column], mask[-1, column] = pad, 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(rows)}


def test_one_pass_keeps_every_micro_batch_whole_and_in_order() -> None:
    micro = [(0, _batch(4, 3, 100)), (1, _batch(3, 5, 200)), (2, _batch(5, 2, 300))]
    (parts,) = split_passes(micro, None)
    assert [(p.lane, p.start, p.rows, p.of) for p in parts] == [(0, 0, 4, 4), (1, 4, 3, 3), (2, 7, 5, 5)]
    assert all(p.batch is batch for p, (_, batch) in zip(parts, micro))


def test_passes_of_at_most_n_rows_group_rows_by_length_across_lanes() -> None:
    # Real lengths: lane 0: 3,3,3,2; lane 1: 5,5,4; lane 2: 2,2,2,2,1 (each micro-batch's last row is shorter).
    micro = [(0, _batch(4, 3, 100)), (1, _batch(3, 5, 200)), (2, _batch(5, 2, 300))]
    passes = split_passes(micro, 5)
    assert [[(p.lane, p.start, p.rows, p.of) for p in parts] for parts in passes] == [
        [(0, 0, 2, 4), (1, 2, 3, 3)], [(0, 0, 2, 4), (2, 2, 3, 5)], [(2, 0, 2, 5)]]
    assert [join_inputs(parts, 0, "right")["input_ids"].shape for parts in passes] == [(5, 5), (5, 3), (2, 2)]
    # Every row of every lane lands in exactly one pass, in its lane's order, its label with it.
    for lane, batch in micro:
        ids = torch.cat([p.batch["input_ids"] for parts in passes for p in parts if p.lane == lane])
        torch.testing.assert_close(ids, batch["input_ids"])
        labels = torch.cat([p.batch["labels"] for parts in passes for p in parts if p.lane == lane])
        assert torch.equal(labels, batch["labels"])
    with pytest.raises(ValueError, match="max_rows"):
        split_passes(micro, 0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_parts_are_padded_to_the_longest_on_the_tokenizers_side(side: str) -> None:
    left = side == "left"
    parts = split_passes([(0, _batch(2, 3, 10, pad=9, left=left)), (1, _batch(2, 5, 50, pad=9, left=left))], None)[0]
    joined = join_inputs(parts, pad_token_id=9, padding_side=side)
    assert joined.keys() == {"input_ids", "attention_mask"}  # labels stay with their parts
    assert joined["input_ids"].shape == joined["attention_mask"].shape == (4, 5)
    short = joined["input_ids"][:2, 2:] if left else joined["input_ids"][:2, :3]
    torch.testing.assert_close(short, parts[0].batch["input_ids"])
    pads = joined["input_ids"][:2, :2] if left else joined["input_ids"][:2, 3:]
    assert bool((pads == 9).all())
    assert joined["attention_mask"][:2].sum() == parts[0].batch["attention_mask"].sum()  # added pads are masked
    torch.testing.assert_close(joined["input_ids"][2:], parts[1].batch["input_ids"])
    # Columns that hold only padding are cut: one row of 4 real tokens in a width of 5.
    (only,) = split_passes([(0, _batch(1, 5, 10, pad=9, left=left))], None)
    cut = join_inputs(only, 9, side)
    assert cut["input_ids"].shape == (1, 4) and bool(cut["attention_mask"].all())
    torch.testing.assert_close(cut["input_ids"][0], torch.arange(11, 15) if left else torch.arange(10, 14))


def test_parts_with_other_inputs_are_refused() -> None:
    a, b = _batch(1, 2, 0), _batch(1, 2, 5)
    b["token_type_ids"] = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="one tokenizer for every adapter"):
        join_inputs(split_passes([(0, a), (1, b)], None)[0], 0, "right")
    with pytest.raises(ValueError, match="padding_side"):
        join_inputs(split_passes([(0, a)], None)[0], 0, "middle")
