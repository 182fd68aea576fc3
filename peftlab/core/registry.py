"""The method registry: every method registers its name, config class and builder here.

A builder takes the base model and a config and returns a *placement*: a dict from module name
(``""`` for the model level) to the delta placed there. It must not modify the model.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

from torch import nn

from peftlab.core.config import AdapterConfig, ConfigError

Placement = dict  # dict[str, Delta]
Builder = Callable[[nn.Module, AdapterConfig], Placement]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_cls: type[AdapterConfig]
    build: Builder
    family: str  # additive | selective | reparam | hybrid


_METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type[AdapterConfig], family: str) -> Callable[[Builder], Builder]:
    """Decorator: ``@register_method("lora", LoraConfig, "reparam")`` on a builder function."""

    def deco(build: Builder) -> Builder:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = MethodSpec(name, config_cls, build, family)
        return build

    return deco


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name``; an unknown name lists the closest registered ones."""
    _ensure_loaded()
    if name not in _METHODS:
        close = difflib.get_close_matches(name, list(_METHODS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown method {name!r}.{hint} Registered: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _ensure_loaded()
    return sorted(_METHODS)


def method_specs() -> list[MethodSpec]:
    """Every registered method, sorted by name."""
    _ensure_loaded()
    return [_METHODS[n] for n in sorted(_METHODS)]


def _ensure_loaded() -> None:
    # Importing the methods package runs every @register_method decorator once.
    import peftlab.methods  # noqa: F401
