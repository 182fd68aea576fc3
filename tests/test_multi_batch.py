"""Joint batches of a multi-adapter run: rows cut into forward passes in order, and the parts of a pass
re-padded to a common length on the tokenizer's side (``peftlab.train.multi_batch``)."""

from __future__ import annotations

import pytest
import torch

from peftlab.train.multi_batch import join_inputs, split_passes


def _batch(rows: int, length: int, first: int, pad: int = 0) -> dict[str, torch.Tensor]:
    """``rows`` rows of ids first, first+1, ... with the last row one token shorter (right-padded)."""
    ids = torch.arange(first, first + rows * length).reshape(rows, length)
    mask = torch.ones(rows, length, dtype=torch.long)
    ids[-1, -1], mask[-1, -1] = pad, 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(rows)}


def test_passes_take_rows_in_order_and_split_a_lane_where_they_must() -> None:
    micro = [(0, _batch(4, 3, 100)), (1, _batch(3, 5, 200)), (2, _batch(5, 2, 300))]
    one = split_passes(micro, None)
    assert [(p.lane, p.start, p.rows, p.of) for p in one[0]] == [(0, 0, 4, 4), (1, 4, 3, 3), (2, 7, 5, 5)]
    passes = split_passes(micro, 5)
    assert [[(p.lane, p.start, p.rows, p.of) for p in parts] for parts in passes] == [
        [(0, 0, 4, 4), (1, 4, 1, 3)], [(1, 0, 2, 3), (2, 2, 3, 5)], [(2, 0, 2, 5)]]
    # Every row of every lane lands in exactly one pass, in order, labels with it.
    for lane, batch in micro:
        got = torch.cat([p.batch["input_ids"] for parts in passes for p in parts if p.lane == lane])
        torch.testing.assert_close(got, batch["input_ids"])
        assert torch.equal(torch.cat([p.batch["labels"] for parts in passes for p in parts if p.lane == lane]),
                           batch["labels"])
    with pytest.raises(ValueError, match="max_rows"):
        split_passes(micro, 0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_parts_are_padded_to_the_longest_on_the_tokenizers_side(side: str) -> None:
    parts = split_passes([(0, _batch(2, 3, 10, pad=9)), (1, _batch(1, 5, 50, pad=9))], None)[0]
    joined = join_inputs(parts, pad_token_id=9, padding_side=side)
    assert joined.keys() == {"input_ids", "attention_mask"}  # labels stay with their parts
    assert joined["input_ids"].shape == joined["attention_mask"].shape == (3, 5)
    short = joined["input_ids"][:2, :3] if side == "right" else joined["input_ids"][:2, 2:]
    torch.testing.assert_close(short, parts[0].batch["input_ids"])
    pads = joined["input_ids"][:2, 3:] if side == "right" else joined["input_ids"][:2, :2]
    assert bool((pads == 9).all())
    mask = joined["attention_mask"][:2]
    assert mask.sum().item() == parts[0].batch["attention_mask"].sum().item()  # added pads are masked
    torch.testing.assert_close(joined["input_ids"][2], parts[1].batch["input_ids"][0])


def test_parts_with_other_inputs_are_refused() -> None:
    a, b = _batch(1, 2, 0), _batch(1, 2, 5)
    b["token_type_ids"] = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="one tokenizer for every adapter"):
        join_inputs(split_passes([(0, a), (1, b)], None)[0], 0, "right")
    with pytest.raises(ValueError, match="padding_side"):
        join_inputs(split_passes([(0, a)], None)[0], 0, "middle")
