"""The request bodies of the OpenAI-compatible routes, as pydantic models, and their translation into
engine requests.

The fields are OpenAI's (``/v1/completions``, ``/v1/chat/completions``) and vLLM's
(``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``). ``model`` names the adapter, or the base
model's name for no adapter, as in vLLM and LoRAX. Fields the server does not implement (log
probabilities, penalties, tools...) are accepted at their neutral value and refused with a 400 naming
the field otherwise; unknown extra fields are ignored, as OpenAI's API does.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import InvalidRequestError
from .requests import GenerationRequest

#: Most choices one call may ask for (prompts x n): each is a request in the engine's queue.
MAX_CHOICES = 16


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    """``stream_options``: ``include_usage`` adds a last chunk with the token counts."""

    include_usage: bool = False


class _Sampling(_Body):
    """The decoding fields both generation routes share (OpenAI's names and defaults)."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    #: Field -> the values this server accepts for it (the neutral ones); others are refused.
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {"presence_penalty": (0.0,), "frequency_penalty": (0.0,),
                                                         "logit_bias": (None, {})}

    def check_supported(self) -> None:
        """Raise :class:`InvalidRequestError` naming the first field set to a value this server does
        not implement."""
        for name, accepted in self.UNSUPPORTED.items():
            if getattr(self, name) not in accepted:
                raise InvalidRequestError(f"field {name!r} is not supported by this server: leave it out (or "
                                          f"{' / '.join(map(repr, accepted))})", field=name)

    def requested_max_tokens(self) -> int | None:
        """The most tokens to generate per choice; None: up to the model's context."""
        return self.max_tokens

    def stop_list(self) -> list[str]:
        """``stop`` as a list of strings (OpenAI allows one string or a list)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, a list of token ids or a
    list of such lists (one choice per prompt and per ``n``)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {**_Sampling.UNSUPPORTED, "echo": (False,), "logprobs": (None,),
                                                         "best_of": (None, 1), "suffix": (None, "")}


class ChatMessage(_Body):
    """One chat message; ``content`` may be a string or OpenAI's list of ``{"type": "text"}`` parts."""

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: the messages go through the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {**_Sampling.UNSUPPORTED, "logprobs": (False, None),
                                                         "top_logprobs": (None, 0), "tools": (None, []),
                                                         "response_format": (None, {"type": "text"})}

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's newer name) or ``max_tokens``; None: up to the context."""
        return self.max_completion_tokens or self.max_tokens


class LoadLoraRequest(_Body):
    """vLLM's ``POST /v1/load_lora_adapter`` body."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraRequest(_Body):
    """vLLM's ``POST /v1/unload_lora_adapter`` body."""

    lora_name: str = Field(min_length=1)


# -- translation into engine requests --------------------------------------------------------------
def adapter_of(model: str, base_name: str) -> str | None:
    """The adapter a request's ``model`` field names: ``None`` (the base model) for the base's name."""
    return None if model == base_name else model


def completion_prompts(body: CompletionRequest, tokenizer: Any) -> list[list[int]]:
    """The token ids of each prompt of a completion request (texts through the tokenizer, with its
    usual special tokens)."""
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]  # type: ignore[arg-type]
    else:
        prompts = list(prompt)  # type: ignore[arg-type]
    if not prompts:
        raise InvalidRequestError("field 'prompt': expected a non-empty string or list", field="prompt")
    out = []
    for p in prompts:
        ids = tokenizer(p).input_ids if isinstance(p, str) else list(p)
        if not ids:
            raise InvalidRequestError("field 'prompt': a prompt encodes to no tokens", field="prompt")
        out.append(ids)
    return out


def _message_text(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequestError(f"field 'messages.{index}.content': only text parts "
                                      f"({{'type': 'text', 'text': ...}}) are supported, got {part.get('type')!r}",
                                      field=f"messages.{index}.content")
        texts.append(part["text"])
    return "".join(texts)


def chat_prompt(body: ChatCompletionRequest, tokenizer: Any) -> list[int]:
    """The token ids of the chat's messages rendered by the tokenizer's chat template, ending with
    the assistant's turn (``add_generation_prompt``); the template writes the special tokens."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this model's tokenizer has no chat template: use /v1/completions with a "
                                  "prompt instead", field="messages")
    messages = [{"role": m.role, "content": _message_text(m, i)} for i, m in enumerate(body.messages)]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def generation_requests(body: _Sampling, prompts: list[list[int]], base_name: str,
                        max_context: int | None) -> list[GenerationRequest]:
    """One engine request per prompt and per ``n`` (prompt-major, OpenAI's choice order). Without
    ``max_tokens`` a choice may run to the end of the context (as in vLLM); the i-th copy of a
    seeded prompt gets ``seed + i`` so that the ``n`` samples differ."""
    body.check_supported()
    if len(prompts) * body.n > MAX_CHOICES:
        raise InvalidRequestError(f"field 'n': {len(prompts)} prompts x n={body.n} asks for more than "
                                  f"{MAX_CHOICES} choices in one call", field="n")
    adapter = adapter_of(body.model, base_name)
    requested = body.requested_max_tokens()

    def max_tokens(ids: list[int]) -> int:
        if requested is not None or max_context is None:
            return requested or 16
        return max(1, max_context - len(ids))  # a prompt too long for the context is the engine's 400

    return [GenerationRequest(prompt_ids=ids, adapter=adapter, max_tokens=max_tokens(ids),
                              temperature=body.temperature, top_p=body.top_p,
                              seed=None if body.seed is None else body.seed + i, stop=body.stop_list())
            for ids in prompts for i in range(body.n)]


def now() -> int:
    """OpenAI's ``created``: seconds since the epoch."""
    return int(time.time())
