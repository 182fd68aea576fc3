"""What ``peftlab bench methods --preset smoke`` needs to run in seconds: tiny models with a
classification head, a word-hashing tokenizer for them, and a small synthetic text task.

* :func:`tiny_classifier` -- a tiny random BERT, Llama or GPT-2 (``peftlab.zoo.tiny_model``'s
  configs) with a sequence-classification (or regression) head of the task's width, seeded;
* :class:`HashTokenizer` -- words to ids by a stable hash (crc32) into the tiny vocabulary, with
  the call signature :func:`peftlab.train.batching.encode` uses, so the tiny models read any text
  task through the same data path as the real models;
* :func:`smoke_task` -- a synthetic sentiment task (label 1 when a sentence holds more words from
  a positive list than from a negative one), generated from a seed, as
  :class:`~peftlab.train.examples.Examples`.
"""

from __future__ import annotations

import copy
import random
import zlib
from collections.abc import Sequence
from typing import Any

from peftlab.train.examples import Examples

#: The tiny model names the benchmark accepts: ``tiny-<kind>``.
TINY_KINDS = ("bert", "llama", "gpt2")
TINY_PREFIX = "tiny-"
#: The tiny models' special ids (``peftlab.zoo.tiny``): pad, begin, end/separator.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SMOKE_TASK = "smoke"

_POSITIVE = ("good", "great", "fine", "happy", "nice", "best", "lovely", "bright")
_NEGATIVE = ("bad", "awful", "poor", "sad", "worst", "ugly", "dull", "boring")
_NEUTRAL = ("the", "a", "movie", "film", "plot", "actor", "scene", "was", "is", "and", "story", "very")


def is_tiny(model: str) -> bool:
    """Whether ``model`` names a tiny test model (``tiny-bert``, ``tiny-llama``, ``tiny-gpt2``)."""
    return model.startswith(TINY_PREFIX) and model[len(TINY_PREFIX):] in TINY_KINDS


def tiny_classifier(model: str, kind: str, num_labels: int, seed: int = 0) -> Any:
    """A tiny random model ``tiny-<bert|llama|gpt2>`` with a sequence-classification head of
    ``num_labels`` outputs (``kind="regression"``: one output, MSE loss), in eval mode. The body
    and the head are drawn under ``seed``, so every run starts from the same weights."""
    import transformers

    from peftlab.zoo import tiny_model
    from peftlab.zoo.seeding import seeded

    arch = model[len(TINY_PREFIX):]
    if arch not in TINY_KINDS:
        raise ValueError(f"unknown tiny model {model!r}; expected one of "
                         f"{', '.join(TINY_PREFIX + k for k in TINY_KINDS)}")
    config = copy.deepcopy(tiny_model(arch).config)
    config.num_labels = 1 if kind == "regression" else num_labels
    config.problem_type = "regression" if kind == "regression" else "single_label_classification"
    config.pad_token_id = PAD_ID
    with seeded(seed):
        net = transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    return net.eval()


class HashTokenizer:
    """A word-level tokenizer for the tiny models: lower-cased words hashed (crc32) into the ids
    above the special ones, ``[BOS] a [EOS]`` or ``[BOS] a [EOS] b [EOS]`` with token types for
    pairs, cut to ``max_length``. ``padding_side`` is left for decoders (their classification
    head reads the last position), right for encoders."""

    pad_token_id = PAD_ID
    eos_token_id = EOS_ID

    def __init__(self, vocab_size: int = 128, padding_side: str = "right") -> None:
        """A tokenizer into ``vocab_size`` ids padding on ``padding_side``."""
        self.vocab_size = vocab_size
        self.padding_side = padding_side

    def word_id(self, word: str) -> int:
        """The id of one word: stable across processes and runs (crc32, not Python's hash)."""
        return 3 + zlib.crc32(word.lower().encode()) % (self.vocab_size - 3)

    def _ids(self, text: str) -> list[int]:
        return [self.word_id(w) for w in text.split()]

    def __call__(self, first: Sequence[str], second: Sequence[str] | None = None, truncation: bool = True,
                 max_length: int = 64, padding: bool = False) -> dict[str, list[list[int]]]:
        """Encode a batch of texts (or pairs) unpadded, as a Hugging Face tokenizer called with
        ``padding=False`` does: ``input_ids``, ``attention_mask`` and ``token_type_ids``."""
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "token_type_ids": []}
        for i, text in enumerate(first):
            a = [BOS_ID, *self._ids(text), EOS_ID]
            b = [*self._ids(second[i]), EOS_ID] if second is not None else []
            ids, types = a + b, [0] * len(a) + [1] * len(b)
            if truncation:
                ids, types = ids[:max_length], types[:max_length]
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["token_type_ids"].append(types)
        return out


def tiny_tokenizer(model: str) -> HashTokenizer:
    """The :class:`HashTokenizer` for a tiny model (left padding for the decoders)."""
    from peftlab.zoo.tiny import VOCAB

    return HashTokenizer(VOCAB, "right" if model == TINY_PREFIX + "bert" else "left")


def smoke_task(split: str, size: int, seed: int = 0) -> Examples:
    """``size`` synthetic sentences of split ``"train"`` or ``"eval"`` (different draws): 6 to 12
    words, an odd number (1, 3 or 5) of them from the positive or negative list; label
    ``positive`` when the positive words are the majority. Metric: accuracy."""
    rng = random.Random(f"{SMOKE_TASK}-{split}-{seed}")
    texts: list[tuple[str, ...]] = []
    labels: list[int] = []
    for _ in range(size):
        polar = rng.choice((1, 3, 5))
        positives = rng.randint(0, polar)
        words = [rng.choice(_POSITIVE) for _ in range(positives)]
        words += [rng.choice(_NEGATIVE) for _ in range(polar - positives)]
        words += [rng.choice(_NEUTRAL) for _ in range(rng.randint(6, 12) - polar)]
        rng.shuffle(words)
        texts.append((" ".join(words),))
        labels.append(int(positives * 2 > polar))
    return Examples(texts=texts, labels=labels, label_names=["negative", "positive"], kind="classification",
                    metrics=["accuracy"], task=SMOKE_TASK, source=f"synthetic {SMOKE_TASK} task (seed {seed})")
