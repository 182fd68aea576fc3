"""How a prompt and its response become the text a model reads: the model's chat template when its
tokenizer has one, else a plain instruction format; seq2seq models read the prompt as written.

For ``causal-lm`` the training text is ``prompt_text + response_text`` and the loss covers only the
response part (see :mod:`peftlab.train.generative_data`):

* ``chat``: ``prompt_text`` is ``apply_chat_template([user: prompt], add_generation_prompt=True)``
  and ``response_text`` what the template adds for the assistant's turn (SmolLM2:
  ``response + "<|im_end|>\\n"``), so a trained model ends its answer as the template does;
* ``plain``: ``prompt_text`` is :data:`PLAIN_TEMPLATE` filled with the prompt, ``response_text``
  the response followed by the tokenizer's eos token (when it has one).

For ``seq2seq`` the encoder reads the prompt and the decoder's target is the response (the
tokenizer's eos appended when it does not add one itself).
"""

from __future__ import annotations

from typing import Any, Literal

PromptFormat = Literal["chat", "plain", "seq2seq"]
PROMPT_FORMATS: tuple[str, ...] = ("auto", "chat", "plain")

#: The plain format, for tokenizers without a chat template (Alpaca's own layout, without its preamble).
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"


def choose_format(tokenizer: Any, kind: str, requested: str = "auto") -> PromptFormat:
    """The prompt format for ``kind`` ("causal-lm" or "seq2seq"): ``requested`` ("auto", "chat" or
    "plain"); "auto" is "chat" when the tokenizer has a chat template, else "plain". seq2seq always
    reads the prompt as written. Raises ValueError for "chat" without a template."""
    if kind == "seq2seq":
        return "seq2seq"
    if requested not in PROMPT_FORMATS:
        raise ValueError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, not {requested!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if requested == "chat" and not has_template:
        raise ValueError("--prompt-format chat: this tokenizer has no chat template; use plain or auto")
    if requested == "auto":
        return "chat" if has_template else "plain"
    return requested  # type: ignore[return-value]


def prompt_text(tokenizer: Any, prompt: str, fmt: PromptFormat) -> str:
    """The text the model reads before its answer (what generation continues)."""
    if fmt == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             add_generation_prompt=True, tokenize=False)
    if fmt == "plain":
        return PLAIN_TEMPLATE.format(prompt=prompt)
    return prompt


def response_text(tokenizer: Any, prompt: str, response: str, fmt: PromptFormat) -> str:
    """The text after :func:`prompt_text` that the loss is taken on (the answer and its end mark)."""
    if fmt == "chat":
        before = prompt_text(tokenizer, prompt, fmt)
        full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
        if not full.startswith(before):
            raise ValueError("the chat template renders the conversation with a different start than the "
                             "prompt alone; use --prompt-format plain")
        return full[len(before):]
    eos = getattr(tokenizer, "eos_token", None) or ""
    return response + eos if fmt == "plain" else response
