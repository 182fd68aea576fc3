"""The serving engine: continuous batching of many adapters over one base model.

(Work in progress: the dataclasses and the signatures below are final; the bodies follow.)
"""

from __future__ import annotations

from .requests import GenerationRequest, GenerationResult, RequestHandle, TokenEvent

__all__ = ["Engine", "GenerationRequest", "GenerationResult", "RequestHandle", "TokenEvent"]


class Engine:
    """Serves generation requests for many adapters over one base model (signatures final)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 32, max_queue: int = 256, device=None,
                 allowed_roots=None, max_adapter_bytes: int = 2**30, device_adapters: int = 64,
                 host_budget_bytes: int = 2**31, merge_policy=True, max_context: int | None = None):
        raise NotImplementedError("Engine: work in progress")

    @classmethod
    def from_zoo(cls, name: str = "smollm2", **kw) -> "Engine":
        """An engine over a zoo model."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, path, **kw) -> "Engine":
        """An engine over a Hugging Face causal LM directory."""
        raise NotImplementedError

    def start(self) -> "Engine": raise NotImplementedError
    def stop(self) -> None: raise NotImplementedError
    def __enter__(self) -> "Engine": return self.start()
    def __exit__(self, *exc) -> None: self.stop()
    def submit(self, req: GenerationRequest) -> RequestHandle: raise NotImplementedError
    def generate(self, req: GenerationRequest) -> GenerationResult: return self.submit(req).result()
    def load_adapter(self, name: str, path) -> None: raise NotImplementedError
    def unload_adapter(self, name: str) -> None: raise NotImplementedError
    def adapter_names(self) -> list[str]: raise NotImplementedError
    def stats(self) -> dict: raise NotImplementedError
