"""The method registry: one declaration per method (DESIGN.md principle 6).

A method registers a :class:`MethodSpec`: its name (declared here only: registration stamps it on
the config class), family, site kinds, whether it merges, whether it batches per row, the Hugging
Face PEFT format it reads and writes, what it needs from a model, an example config string and a
default learning rate. The core, ``peftlab train`` and the registry-driven tests read these fields;
nothing about a method is found by probing its classes.

A builder takes the base model and a config and returns a *placement*: a dict from module name
(``""`` for the model level) to the delta placed there. It must not modify the model. A hybrid
(a :class:`~peftlab.core.config.HybridConfig`: MAM, UniPELT) registers no builder: core places the
union of its parts, each through its own method's builder.

The core never imports ``peftlab.methods``: importing ``peftlab`` registers every built-in method.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from peftlab.core.config import AdapterConfig, ConfigError, HybridConfig
from peftlab.core.targeting import TargetError
from peftlab.core.training import TrainingHooks

Placement = dict  # dict[str, Delta]
Builder = Callable[[nn.Module, AdapterConfig], Placement]

FAMILIES = ("additive", "selective", "reparam", "hybrid")
#: Where a method touches the model (DESIGN.md principle 2; ``core/delta.py`` for what each computes).
SITE_KINDS = ("parallel", "input", "output", "model")


class NotApplicableError(TargetError):
    """A method was applied to a model that lacks something the method needs (its message names the
    method, the model class and what is missing)."""


@dataclass(frozen=True)
class Requirement:
    """Something a method needs from the model it is applied to.

    ``what`` completes the sentence "<method> needs ..." for the error message; ``met(model)`` says
    whether ``model`` has it; ``hint`` suggests what to use instead.
    """

    what: str
    met: Callable[[nn.Module], bool]
    hint: str = ""


@dataclass(frozen=True)
class PeftFormat:
    """How a method reads and writes Hugging Face PEFT's ``adapter_config.json``.

    ``write(config, placed)`` returns PEFT's config fields (``placed`` = {module name: delta} of a
    placed adapter, or None) or ``{"peft_type": "PEFTLAB"}`` for a config PEFT cannot express;
    ``read(fields)`` turns PEFT's fields for ``peft_type`` into our config. Exactly one method reads
    a ``peft_type``; variants that PEFT writes under the same type (DoRA is ``LORA`` with
    ``use_dora``) declare ``read=None`` and are recognised by that one reader.
    """

    peft_type: str
    read: Callable[[dict[str, Any]], AdapterConfig] | None
    write: Callable[[AdapterConfig, "dict[str, nn.Module] | None"], dict[str, Any]]


@dataclass(frozen=True)
class MethodSpec:
    """Everything the core and the tests know about a method; see the module docstring."""

    name: str
    config_cls: type[AdapterConfig]
    #: None for a hybrid: its parts' builders place it.
    build: Builder | None
    family: str
    #: Site kinds its deltas use (a subset of ``SITE_KINDS``).
    sites: tuple[str, ...]
    #: Whether every delta it places folds into the base weights (merge / unmerge / merge_and_unload).
    merges: bool
    #: Whether a mixed batch (one adapter per row) is served in one batched computation.
    per_row: bool
    #: An example config in the string grammar (shown by ``peftlab methods``, parsed by the tests).
    example: str
    #: Learning rate used by ``peftlab train`` and the tests when none is given.
    default_lr: float
    #: Hugging Face PEFT's format, if PEFT has the method.
    peft: PeftFormat | None = None
    #: What a model must have for the method to apply (checked before building).
    needs: tuple[Requirement, ...] = ()
    #: What the method does while it trains (loss term, action per step, calibration), if anything.
    training: type[TrainingHooks] | None = None

    def missing(self, model: nn.Module) -> list[Requirement]:
        """The requirements ``model`` does not meet (empty: the method applies)."""
        return [r for r in self.needs if not r.met(model)]

    def applies_to(self, model: nn.Module) -> bool:
        """Whether every requirement of the method is met by ``model``."""
        return not self.missing(model)

    def check_applicable(self, model: nn.Module) -> None:
        """Raise :class:`NotApplicableError` naming the method, the model class and what is missing."""
        missing = self.missing(model)
        if missing:
            needs = "; ".join(r.what for r in missing)
            hints = " ".join(r.hint for r in missing if r.hint)
            raise NotApplicableError(
                f"{self.name} cannot be applied to {type(model).__name__}: it needs {needs}, "
                f"which {type(model).__name__} does not have.{' ' + hints if hints else ''}"
            )


_METHODS: dict[str, MethodSpec] = {}
_BY_PEFT_TYPE: dict[str, MethodSpec] = {}


def register_method(
    name: str,
    config_cls: type[AdapterConfig],
    build: Builder | None,
    *,
    family: str,
    sites: tuple[str, ...],
    merges: bool,
    per_row: bool,
    example: str,
    default_lr: float,
    peft: PeftFormat | None = None,
    needs: tuple[Requirement, ...] = (),
    training: type[TrainingHooks] | None = None,
) -> MethodSpec:
    """Declare a method once. ``name`` becomes ``config_cls.method``; every field is validated."""
    if name in _METHODS:
        raise ValueError(f"method {name!r} is registered twice")
    own = config_cls.__dict__.get("method")
    if own not in (None, name):
        raise ValueError(f"{config_cls.__name__}.method is {own!r} but it is registered as {name!r}")
    if family not in FAMILIES:
        raise ValueError(f"method {name!r}: family {family!r} is not one of {FAMILIES}")
    bad = [s for s in sites if s not in SITE_KINDS]
    if not sites or bad:
        raise ValueError(f"method {name!r}: sites {sites!r} must be a non-empty subset of {SITE_KINDS}")
    if not default_lr > 0:
        raise ValueError(f"method {name!r}: default_lr must be positive")
    if (build is None) != issubclass(config_cls, HybridConfig):
        raise ValueError(f"method {name!r}: a hybrid (HybridConfig) registers no builder, every other method one")
    if peft is not None and peft.read is not None and peft.peft_type in _BY_PEFT_TYPE:
        raise ValueError(f"PEFT type {peft.peft_type!r} is read by {_BY_PEFT_TYPE[peft.peft_type].name!r} already")
    config_cls.method = name
    if training is not None and not issubclass(training, TrainingHooks):
        raise ValueError(f"method {name!r}: training must be a TrainingHooks subclass")
    spec = MethodSpec(name, config_cls, build, family, tuple(sites), merges, per_row, example, default_lr,
                      peft, tuple(needs), training)
    _METHODS[name] = spec
    if peft is not None and peft.read is not None:
        _BY_PEFT_TYPE[peft.peft_type] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name``; an unknown name lists the closest registered ones."""
    if name not in _METHODS:
        # Names are lower case: a case-insensitive match (LoRA -> lora) comes first.
        same = [m for m in _METHODS if m.lower() == str(name).lower()]
        close = same + [m for m in difflib.get_close_matches(str(name).lower(), list(_METHODS), n=3) if m not in same]
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown method {name!r}.{hint} Registered: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def method_for_peft_type(peft_type: str) -> MethodSpec | None:
    """The method that reads Hugging Face PEFT's ``peft_type`` (None if none does)."""
    return _BY_PEFT_TYPE.get(peft_type)


def peft_types() -> list[str]:
    """Every PEFT type some registered method reads, sorted."""
    return sorted(_BY_PEFT_TYPE)


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_METHODS)


def method_specs() -> list[MethodSpec]:
    """Every registered method, sorted by name."""
    return [_METHODS[n] for n in sorted(_METHODS)]
