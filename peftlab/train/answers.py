"""Final answers out of generated text: extraction with a regular expression, normalisation, and
exact match (GSM8K style: the reference's ``#### 72`` against the number the model gives)."""

from __future__ import annotations

import re
from collections.abc import Sequence

#: GSM8K's final-answer line, e.g. ``#### 1,234``.
GSM8K_ANSWER_REGEX = r"#### (-?[\d,\.]+)"


def compile_answer_regex(pattern: str) -> re.Pattern[str]:
    """``pattern`` compiled; ValueError naming the flag when it is not a valid regular expression."""
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"--answer-regex {pattern!r} is not a regular expression ({err})") from None


def extract_answer(text: str, pattern: str | re.Pattern[str]) -> str | None:
    """The final answer in ``text``: group 1 (else the whole match) of the *last* match of
    ``pattern``, normalised by :func:`normalise_answer`; None when nothing matches."""
    regex = compile_answer_regex(pattern) if isinstance(pattern, str) else pattern
    matches = list(regex.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    return normalise_answer(last.group(1) if regex.groups else last.group(0))


def normalise_answer(answer: str) -> str:
    """Whitespace, thousands separators, a leading ``$`` and trailing ``.`` removed; a number is
    written in its shortest form (``"1,234.50"`` -> ``"1234.5"``, ``"72.0"`` -> ``"72"``)."""
    text = answer.strip().replace(",", "").lstrip("$").rstrip(".").strip()
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else repr(value)


def exact_match(generations: Sequence[str], references: Sequence[str], pattern: str) -> tuple[float, int]:
    """(share of examples whose extracted answers are equal, number of generations with no answer).

    A reference without an answer counts as a miss; so does a generation without one.
    EM = (1/n) Σᵢ [a(gᵢ) = a(rᵢ) ≠ None], a the extraction of :func:`extract_answer`.
    """
    if len(generations) != len(references):
        raise ValueError(f"{len(generations)} generations but {len(references)} references")
    if not references:
        raise ValueError("no examples to score")
    regex = compile_answer_regex(pattern)
    hits = missing = 0
    for generated, reference in zip(generations, references):
        got, want = extract_answer(generated, regex), extract_answer(reference, regex)
        missing += got is None
        hits += got is not None and got == want
    return hits / len(references), missing
