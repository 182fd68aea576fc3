"""Tiny random transformers models saved as model directories with a word-level tokenizer built
offline, for tests of the command line (``--model DIR``)."""

from __future__ import annotations

from pathlib import Path

#: The words the tokenizers know (plus digits for the decoder and seq2seq ones).
WORDS = ["good", "bad", "fine", "awful", "movie", "plot", "one", "two", "the", "a", "is", "was"]


def _word_tokenizer(directory: Path, kind: str, every_id: bool = False) -> None:
    """A word-level tokenizer (ids below the tiny models' vocabulary of 128) saved into ``directory``;
    with ``every_id`` the decoder's vocabulary is filled up to 128 with words ``w<id>``, so that every
    id a tiny model generates decodes to a word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertTokenizer, PreTrainedTokenizerFast

    if kind == "bert":
        (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
        BertTokenizer(str(directory / "vocab.txt")).save_pretrained(directory)
        return
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *WORDS, *map(str, range(10))])}
    if every_id:
        vocab.update({f"w{i}": i for i in range(len(vocab), 128)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                            unk_token="<unk>").save_pretrained(directory)


def tiny_model_dir(root: Path, kind: str, task: str, every_id: bool = False) -> Path:
    """A tiny random ``kind`` model for ``task`` and a matching tokenizer, saved as a model directory
    (``every_id``: see :func:`_word_tokenizer`)."""
    from peftlab.zoo import tiny_model

    directory = root / f"{kind}-{task}" if not every_id else root / f"{kind}-{task}-every-id"
    if not directory.is_dir():
        directory.mkdir(parents=True)
        tiny_model(kind, "base" if task in ("classification", "regression") else task).save_pretrained(directory)
        _word_tokenizer(directory, kind, every_id)
    return directory
