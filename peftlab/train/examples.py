"""The normalised form every data source ends in: :class:`Examples`, plus :class:`DataError`."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

TaskKind = Literal["classification", "regression", "causal-lm", "seq2seq"]
#: A class id (classification), a float target (regression) or a response text (generative kinds).
Label = int | float | str
#: Kinds whose examples are (prompt,) texts with a response text as the label.
GENERATIVE_KINDS: tuple[str, ...] = ("causal-lm", "seq2seq")


class DataError(ValueError):
    """Bad input data or an unknown task: the message is meant for the user, one line."""


@dataclass
class Examples:
    """Texts and labels of one split, normalised.

    ``texts`` holds one tuple per example with one string (single sentence) or two (a pair).
    ``labels`` are class ids (``int``, indexing ``label_names``) for classification,
    ``float`` targets for regression, and response texts for the generative kinds (``causal-lm``
    instruction tuning, ``seq2seq``), whose ``texts`` are one-tuples holding the prompt; for
    regression and the generative kinds ``label_names`` is empty.
    ``source`` says where the data came from and is left out of equality, so the same rows read
    from a file and from the hub compare equal.
    """

    texts: list[tuple[str, ...]]
    labels: list[Label]
    label_names: list[str]
    kind: TaskKind
    metrics: list[str]
    task: str | None = None
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        if self.kind not in ("classification", "regression", *GENERATIVE_KINDS):
            raise ValueError(f"kind must be 'classification', 'regression', 'causal-lm' or 'seq2seq', "
                             f"not {self.kind!r}")

    def __len__(self) -> int:
        """Number of examples."""
        return len(self.labels)

    @property
    def num_labels(self) -> int | None:
        """Output width a model needs: the number of classes, 1 for regression, None for the
        generative kinds (the language model's own head)."""
        if self.kind in GENERATIVE_KINDS:
            return None
        return 1 if self.kind == "regression" else len(self.label_names)

    @property
    def is_generative(self) -> bool:
        """True for instruction tuning (``causal-lm``) and ``seq2seq`` examples."""
        return self.kind in GENERATIVE_KINDS

    @property
    def is_pair(self) -> bool:
        """True when each example is a sentence pair."""
        return bool(self.texts) and len(self.texts[0]) == 2

    def select(self, indices: list[int]) -> Examples:
        """A new :class:`Examples` with the rows at ``indices``, in that order."""
        return Examples(
            texts=[self.texts[i] for i in indices],
            labels=[self.labels[i] for i in indices],
            label_names=list(self.label_names),
            kind=self.kind,
            metrics=list(self.metrics),
            task=self.task,
            source=self.source,
        )

    def sample(self, limit: int | None, seed: int = 0) -> Examples:
        """A deterministic random subset of ``limit`` rows (kept in file order); all rows if
        ``limit`` is None or not smaller than the split."""
        if limit is None or limit >= len(self):
            return self
        if limit < 0:
            raise DataError(f"limit must be >= 0, got {limit}")
        picked = sorted(random.Random(seed).sample(range(len(self)), limit))
        return self.select(picked)

    def split(self, fraction: float, seed: int = 0) -> tuple[Examples, Examples]:
        """Split into (rest, held_out) with ``fraction`` of the rows (at least one) held out,
        chosen at random with ``seed``."""
        if len(self) < 2:
            raise DataError(f"need at least 2 examples to hold some out, have {len(self)}")
        n_held = min(len(self) - 1, max(1, round(len(self) * fraction)))
        held = set(random.Random(seed).sample(range(len(self)), n_held))
        rest = [i for i in range(len(self)) if i not in held]
        return self.select(rest), self.select(sorted(held))

    def label_counts(self) -> dict[str, int]:
        """Examples per class name (classification only)."""
        if self.kind != "classification":
            raise ValueError("label_counts is for classification data")
        counts = {name: 0 for name in self.label_names}
        for label in self.labels:
            counts[self.label_names[int(label)]] += 1
        return counts
