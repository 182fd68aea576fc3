"""A request's output text, token by token: incremental decoding and stop strings.

The text of the generated tokens is decoded with a few prompt tokens before them as context (so a
tokenizer that drops a word's leading space at the start of a sequence keeps it) and the context's
own text cut off. Text is released only when it is final:

* not while it ends in an incomplete UTF-8 character (the tokenizer's ``\\ufffd``);
* not while its end could be the start of a stop string (held back until it is not);
* a stop string ends the output; it and everything after it are never released.
"""

from __future__ import annotations

from typing import Any

_CONTEXT = 4


class TextTracker:
    """Turns one request's tokens into released text (see the module docstring)."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.context = list(prompt_ids[-_CONTEXT:])
        self.context_text = self._decode(self.context)
        self.stop = list(stop)
        self.ids: list[int] = []
        self.released = ""  # the text given out so far
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Add one generated token; return the text it releases ('' if none yet). Sets
        :attr:`stopped` when a stop string appeared."""
        self.ids.append(token_id)
        full = self._decode(self.context + self.ids)
        text = full[len(self.context_text):] if full.startswith(self.context_text) else self._decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._release(text[:cut])
        if text.endswith("\ufffd"):
            return ""
        return self._release(text[: len(text) - self._held(text)])

    def finish(self) -> str:
        """The output ended without a stop string: release what was held back."""
        if self.stopped or not self.ids:
            return ""
        full = self._decode(self.context + self.ids)
        text = full[len(self.context_text):] if full.startswith(self.context_text) else self._decode(self.ids)
        return self._release(text.rstrip("\ufffd"))

    def _held(self, text: str) -> int:
        """Length of the longest end of ``text`` that is a proper start of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self, text: str) -> str:
        if len(text) <= len(self.released) or not text.startswith(self.released):
            return ""
        new = text[len(self.released):]
        self.released = text
        return new
