"""The serving engine: continuous batching of many adapters over one base model.

(Work in progress: the dataclasses are final; :class:`Engine` follows.)
"""

from __future__ import annotations

from .requests import GenerationRequest, GenerationResult, RequestHandle, TokenEvent

__all__ = ["GenerationRequest", "GenerationResult", "RequestHandle", "TokenEvent"]
