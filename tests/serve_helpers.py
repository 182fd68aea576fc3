"""Shared by the serving engine's tests: adapters with nonzero weights saved as real adapter
directories, and the lone-run reference."""

from __future__ import annotations

from pathlib import Path

import torch

import peftlab
from peftlab.serve.engine import Engine, GenerationRequest


def save_adapter(model: torch.nn.Module, spec: str, path: Path, seed: int, std: float = 0.5) -> Path:
    """Attach ``spec`` to ``model``, give every adapter weight a random nonzero value (LoRA's B and
    (IA)³'s scales start at identity), write the directory and give the model back unchanged."""
    gen = torch.Generator().manual_seed(seed)
    pm = peftlab.apply(model, spec)
    with torch.no_grad():
        for name, p in pm.adapter_modules.named_parameters():
            if "ia3" in name:
                p.copy_(0.6 + 0.8 * torch.rand(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    pm.save(path)
    pm.unload()
    return path


def lone_runs(engine: Engine, requests: list[GenerationRequest]) -> list[list[int]]:
    """Each request run on its own (the engine not started: the calling thread runs the steps)."""
    assert engine._thread is None
    return [engine.generate(_copy(r)).token_ids for r in requests]


def _copy(r: GenerationRequest) -> GenerationRequest:
    return GenerationRequest(list(r.prompt_ids), r.adapter, r.max_tokens, r.temperature, r.top_p, r.seed, list(r.stop),
                             r.deadline)


def busy_runs(engine: Engine, requests: list[GenerationRequest], filler: list[GenerationRequest]) -> list[list[int]]:
    """The same requests in a busy batch: the filler first, then the requests joining one by one
    while others are decoding (each waits for the previous one's first token)."""
    engine.start()
    try:
        extra = [engine.submit(_copy(r)) for r in filler]
        handles = []
        for r in requests:
            h = engine.submit(_copy(r))
            next(iter(h.stream(timeout=120)), None)  # joins at a later step than the one before
            handles.append(h)
        out = [h.result(timeout=120).token_ids for h in handles]
        for h in extra:
            h.result(timeout=120)
        return out
    finally:
        engine.stop()


def together_runs(engine: Engine, requests: list[GenerationRequest]) -> list[list[int]]:
    """The same requests submitted at once, before a step runs (this thread runs the steps): their
    prompts are prefilled together, in groups of similar length, whatever their adapters."""
    assert engine._thread is None
    handles = [engine.submit(_copy(r)) for r in requests]
    while not all(h.done for h in handles):
        engine._step()
    return [h.result().token_ids for h in handles]


class CharTokenizer:
    """The tiny models' tokenizer: token id i is one character (no special tokens but eos)."""

    pad_token_id, eos_token_id = 0, 2

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(0x61 + i % 26) if i > 2 else "" for i in ids)


def until_eos(tokens: list[int]) -> list[int]:
    """The tokens before the first end-of-sequence id (2 in the tiny models)."""
    return tokens[: tokens.index(2)] if 2 in tokens else tokens


PROMPTS = [[5, 17, 33, 9, 60, 4], [80, 3, 11], [7, 7, 90, 120, 45, 66, 12, 101, 99, 5, 40, 41, 42], [64]]


def save_tiny_adapters(root: Path, specs: dict[str, str], seed: int) -> Path:
    """Each ``{name: spec}`` saved for the tiny Llama under ``root/name`` (seeds seed, seed+1, ...)."""
    from peftlab.zoo import tiny_model

    for i, (name, spec) in enumerate(specs.items()):
        save_adapter(tiny_model("llama", "causal-lm"), spec, root / name, seed=seed + i)
    return root


def tiny_engine_with(root: Path, names, **kw) -> Engine:
    """An engine over a fresh tiny Llama with the adapters ``names`` of ``root`` loaded."""
    from peftlab.zoo import tiny_model

    engine = Engine(tiny_model("llama", "causal-lm"), CharTokenizer(), allowed_roots=[str(root)], **kw)
    for name in names:
        engine.load_adapter(name, root / name)
    return engine

