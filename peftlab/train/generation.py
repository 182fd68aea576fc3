"""Text from a model: batched generation of continuations of tokenised prompts (left-padded), greedy
or sampled, for exact-match evaluation and ``peftlab generate``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from peftlab.train.batching import pad_rows


def sampling_kwargs(temperature: float, top_p: float) -> dict[str, Any]:
    """``generate`` arguments: greedy decoding when ``temperature`` is 0, else sampling from the
    softmax of logits / temperature restricted to the smallest set of tokens whose probability
    reaches ``top_p`` (nucleus sampling). ValueError on a negative temperature or top_p outside (0, 1]."""
    if temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}


def generate_continuations(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                           device: str | torch.device = "cpu", batch_size: int = 16, temperature: float = 0.0,
                           top_p: float = 1.0, seed: int | None = None, progress: bool = False) -> list[str]:
    """Generate up to ``max_new_tokens`` after each tokenised prompt; return the new text of each
    (special tokens removed), in order.

    Prompts are batched ``batch_size`` at a time and padded on the left so that every row's next
    token follows its own last token; a decoder's output is cut after the prompt, an
    encoder-decoder's output is the decoder's text. ``seed`` seeds torch before sampling. The
    model's train/eval mode is restored.
    """
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    options = sampling_kwargs(temperature, top_p)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    texts: list[str] = []
    starts = range(0, len(prompts), batch_size)
    try:
        with torch.no_grad():
            for start in tqdm(starts, desc="generate", unit="batch", disable=not progress, dynamic_ncols=True):
                rows = [list(p) for p in prompts[start:start + batch_size]]
                length = max(len(r) for r in rows)
                ids = pad_rows(rows, pad, length, left=True).to(device)
                mask = pad_rows([[1] * len(r) for r in rows], 0, length, left=True).to(device)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **options)
                new = out if encoder_decoder else out[:, length:]
                texts.extend(tokenizer.batch_decode(new.cpu(), skip_special_tokens=True))
    finally:
        model.train(was_training)
    return texts
