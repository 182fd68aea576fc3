"""Adapter configs: validated dataclasses that round-trip through JSON and a short string grammar.

Every method's config derives from :class:`AdapterConfig`, which carries the targeting fields that all
methods share (DESIGN.md principle 3). The string grammar, used by the command line, is::

    method[key=value,key=value,...]            e.g.  lora[r=8,alpha=16,targets=q_proj|v_proj]
    method[...]+method[...]                    a union: every part is placed under one adapter name

Values are parsed as ``true``/``false``, ``none``, integers, floats or strings; ``a|b|c`` is a list.
A value for a list-typed field may be a single item. A value starting with ``re:`` is kept whole
(it is a regular expression and may contain ``|``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar


class ConfigError(ValueError):
    """A config field is unknown or has an invalid value; the message names the field."""


def _close(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=3, cutoff=0.5)
    close += [o for o in options if o not in close and (name.startswith(o) or o.startswith(name))]  # rank -> r
    return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


@dataclass(kw_only=True)
class AdapterConfig:
    """Fields shared by every method: where the adapter is placed.

    targets: module names to adapt. An entry matches a module whose full name equals it or ends with
        ``"." + entry``; ``"re:<regex>"`` matches full names by ``re.fullmatch``; ``"all-linear"``
        selects every linear layer except the output head. ``None`` means the method's default.
    exclude: entries with the same matching rules; matching modules are never adapted.
    layers: keep only modules inside these block indices (the first integer in the module's name).
    module_types: keep only modules whose class name is listed (e.g. ``["Linear", "Conv1D"]``).
    modules_to_save: modules (e.g. a freshly initialised classifier head) that the adapter carries a
        fully trainable copy of; the base module itself is never modified.
    """

    method: ClassVar[str] = ""
    #: Whether a fresh adapter computes exactly the base model's function (checked for every method).
    identity_at_init: ClassVar[bool] = True
    #: Where module tensors sit in the file, after PEFT's wrapper names (see ``io.file_key``).
    peft_module_prefix: ClassVar[str] = "base_model.model."
    targets: list[str] | None = None
    exclude: list[str] | None = None
    layers: list[int] | None = None
    module_types: list[str] | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        for name in ("targets", "exclude", "module_types", "modules_to_save"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [value])
            elif value is not None:
                setattr(self, name, [str(v) for v in value])
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        if self.layers is not None:
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise ConfigError(f"{type(self).__name__}.layers must be a list of ints, got {self.layers!r}")
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` on an invalid value. Methods override and call ``super()``."""

    # -- helpers for subclasses -------------------------------------------------------------
    def _check(self, ok: bool, field_name: str, expected: str) -> None:
        if not ok:
            value = getattr(self, field_name)
            raise ConfigError(f"{type(self).__name__}.{field_name}={value!r} is invalid: expected {expected}")

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field plus ``"method"``."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"method": self.method, **d}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AdapterConfig":
        """Build from a dict, refusing unknown fields with the list of valid ones."""
        d = dict(d)
        method = d.pop("method", cls.method)
        if method != cls.method:
            raise ConfigError(f"config is for method {method!r}, not {cls.method!r}")
        valid = cls.field_names()
        for key in d:
            if key not in valid:
                raise ConfigError(
                    f"unknown field {key!r} for {cls.method!r}.{_close(key, valid)} Valid fields: {', '.join(valid)}"
                )
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_string(self) -> str:
        """The config in the string grammar (only fields that differ from their defaults)."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if value == default:
                continue
            parts.append(f"{f.name}={_format_value(value)}")
        # A config with every field at its default is the bare name (``lora``), which parses back.
        return f"{self.method}[{','.join(parts)}]" if parts else self.method

    def replace(self, **changes: Any) -> "AdapterConfig":
        """A copy with some fields changed (validated again)."""
        unknown = [k for k in changes if k not in self.field_names()]
        if unknown:
            raise ConfigError(
                f"unknown field {unknown[0]!r} for {self.method!r}.{_close(unknown[0], self.field_names())} "
                f"Valid fields: {', '.join(self.field_names())}"
            )
        return dataclasses.replace(self, **changes)


class BaseChangingConfig(AdapterConfig):
    """A config *form* that changes the base model, at the user's explicit request, and then places a
    registered method's adapter: ``qlora[...]`` quantizes the base to 4-bit, then places LoRA.

    It is not a method: a builder must not modify the model (``core/registry.py``), and quantizing
    replaces its Linear layers. So ``peftlab.apply`` hands the whole step to :meth:`apply_to`, which
    changes the base and then applies the method's own config (saved files are that method's). A
    form is registered with :func:`register_form` and parsed by the string grammar; it cannot be
    part of a union nor added to a model that has adapters already."""

    def adapter_config(self) -> AdapterConfig:
        """The registered method's config of the adapter the form places (what ``pm.configs`` holds)."""
        raise NotImplementedError

    def apply_to(self, model: Any, adapter_name: str) -> Any:
        """Change ``model`` as the form says and attach the adapter; returns the ``PeftModel``."""
        raise NotImplementedError


def adapter_method(cfg: AdapterConfig) -> str:
    """The registered method ``cfg`` places: its own, or for a form (``qlora``) its adapter's (``lora``)."""
    return cfg.adapter_config().method if isinstance(cfg, BaseChangingConfig) else cfg.method


#: Registered config forms (name -> class): ``register_form``.
_FORMS: dict[str, type[BaseChangingConfig]] = {}


def register_form(name: str, config_cls: type[BaseChangingConfig]) -> None:
    """Declare a :class:`BaseChangingConfig` form under ``name`` (the string grammar's name)."""
    if name in _FORMS:
        raise ValueError(f"config form {name!r} is registered twice")
    if not issubclass(config_cls, BaseChangingConfig):
        raise ValueError(f"{config_cls.__name__} must derive from BaseChangingConfig")
    config_cls.method = name
    _FORMS[name] = config_cls


@dataclass
class UnionConfig:
    """Several method configs placed under one adapter name (hybrids such as MAM or UniPELT)."""

    parts: list[AdapterConfig] = field(default_factory=list)
    method: ClassVar[str] = "union"

    def to_dict(self) -> dict[str, Any]:
        return {"method": "union", "parts": [p.to_dict() for p in self.parts]}

    def to_string(self) -> str:
        return "+".join(p.to_string() for p in self.parts)


@dataclass(kw_only=True)
class HybridConfig(AdapterConfig):
    """A method that is a union of other methods with its own defaults (MAM, UniPELT): :meth:`parts`
    gives the part configs, and core places, saves (``parts.<i>.`` keys) and merges (or refuses) the
    adapter exactly as the :class:`UnionConfig` of those parts; the file keeps the hybrid's own config.

    The targeting fields do not apply (each part goes where its method puts it; write the union
    ``a[...]+b[...]`` to choose modules); ``modules_to_save`` goes to the first part."""

    def validate(self) -> None:
        for name in ("targets", "exclude", "layers", "module_types"):
            self._check(getattr(self, name) is None, name,
                        f"None: {self.method} places each part where its method does (write the union explicitly)")
        try:
            self.parts()
        except ConfigError as e:
            raise ConfigError(f"{type(self).__name__}: {e}") from None

    def parts(self) -> list[AdapterConfig]:
        """The part configs (fresh objects at each call)."""
        raise NotImplementedError

    def union(self) -> UnionConfig:
        """The explicit union this hybrid places."""
        return UnionConfig(self.parts())


# -- string grammar -------------------------------------------------------------------------
_ITEM = re.compile(r"^\s*([A-Za-z_][\w\-]*)\s*(?:\[(.*)\])?\s*$", re.S)


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "|".join(_format_value(v) for v in value)
    return str(value)


def _parse_scalar(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _split_top(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside brackets, parentheses and braces (so a ``re:`` value such as
    ``re:.*\\.(q|k)_proj`` or ``re:.{1,3}`` stays whole); a backslash-escaped character never counts."""
    out, depth, cur = [], 0, []
    escaped = False
    for ch in text:
        if escaped:  # the character after a backslash is literal
            escaped = False
            cur.append(ch)
            continue
        if ch == "\\":
            escaped = True
        elif ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def _is_list_field(cls: type, name: str) -> bool:
    hints = typing.get_type_hints(cls)
    return "list" in str(hints.get(name, ""))


def _coerce(cls: type, name: str, raw: str) -> Any:
    raw = raw.strip()
    if raw == "" and _is_list_field(cls, name):
        return []  # ``exclude=`` is the empty list (what ``to_string`` writes for [])
    if raw.startswith("re:"):
        value: Any = raw
    elif "|" in raw:
        value = [_parse_scalar(v.strip()) for v in raw.split("|")]
    else:
        value = _parse_scalar(raw)
    hint = str(typing.get_type_hints(cls).get(name, ""))
    if _is_list_field(cls, name) and value is not None and not isinstance(value, list):
        value = [value]
    if hint.startswith("str") and value is not None and not isinstance(value, str):
        value = _format_value(value)
    if isinstance(value, list) and "list[str]" in hint:
        value = [_format_value(v) for v in value]
    return value


def parse_method_string(text: str) -> AdapterConfig | UnionConfig:
    """Parse ``lora[r=8,targets=q_proj|v_proj]`` (or a ``+``-joined union) into config objects."""
    from peftlab.core.registry import get_method

    parts = []
    for item in _split_top(text, "+"):
        m = _ITEM.match(item)
        if not m:
            raise ConfigError(f"cannot parse method spec {item!r}: expected name[key=value,...]")
        name, body = m.group(1), m.group(2) or ""
        config_cls = _FORMS[name] if name in _FORMS else get_method(name).config_cls
        kwargs: dict[str, Any] = {}
        for assignment in _split_top(body, ","):
            if not assignment.strip():
                continue
            if "=" not in assignment:
                raise ConfigError(f"in {item!r}: {assignment!r} is not key=value")
            key, raw = assignment.split("=", 1)
            key = key.strip()
            if key not in config_cls.field_names():
                valid = config_cls.field_names()
                raise ConfigError(f"unknown field {key!r} for {name!r}.{_close(key, valid)} Valid fields: {', '.join(valid)}")
            kwargs[key] = _coerce(config_cls, key, raw)
        parts.append(config_cls(**kwargs))
    forms = [p.method for p in parts if isinstance(p, BaseChangingConfig)]
    if forms and len(parts) > 1:
        raise ConfigError(f"{forms[0]} changes the base model and cannot be part of a union ({text!r}); apply it "
                          "alone, then add the other adapters with pm.add_adapter")
    return parts[0] if len(parts) == 1 else UnionConfig(parts)


def config_from_dict(d: dict[str, Any]) -> AdapterConfig | UnionConfig:
    """Inverse of ``to_dict`` for any registered method or a union."""
    from peftlab.core.registry import get_method

    if d.get("method") == "union":
        return UnionConfig([config_from_dict(p) for p in d["parts"]])  # type: ignore[misc]
    if "method" not in d:
        raise ConfigError("config dict has no 'method' field")
    if d["method"] in _FORMS:
        return _FORMS[d["method"]].from_dict(d)
    return get_method(d["method"]).config_cls.from_dict(d)


def is_peft_config(obj: Any) -> bool:
    """Whether ``obj`` looks like a Hugging Face PEFT config object (``peft.LoraConfig(...)``...):
    recognised by its ``peft_type`` and ``to_dict()``, so ``peft`` is never imported here."""
    return (
        not isinstance(obj, (AdapterConfig, UnionConfig, dict, str, type))
        and hasattr(obj, "peft_type")
        and callable(getattr(obj, "to_dict", None))
    )


def _plain(value: Any) -> Any:
    """PEFT's ``to_dict()`` values as JSON would give them: enums as their values, sets and tuples
    as (sorted) lists, so a registered reader sees what it sees in an ``adapter_config.json``."""
    if isinstance(value, dict):
        return {str(_plain(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    enum_value = getattr(value, "value", None)
    if isinstance(value, str) and isinstance(enum_value, str):  # PeftType / TaskType (str enums)
        return enum_value
    return value


#: The heads PEFT gives a trainable copy when it wraps a model for SEQ_CLS / TOKEN_CLS.
_PEFT_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score")}


def from_peft_config(obj: Any) -> AdapterConfig:
    """Our config for a Hugging Face PEFT config object, through the reader its ``peft_type`` is
    registered with (``peft.LoraConfig(use_dora=True)`` gives a DoRA config). As PEFT does when it
    wraps a model, ``task_type`` SEQ_CLS / TOKEN_CLS adds the ``classifier`` / ``score`` heads to
    ``modules_to_save``. A PEFT type no registered method reads raises :class:`ConfigError`."""
    from peftlab.core.registry import method_for_peft_type, peft_types

    fields = _plain(obj.to_dict())
    if not isinstance(fields, dict):
        raise ConfigError(f"{type(obj).__name__}.to_dict() did not return a dict")
    peft_type = _plain(fields.get("peft_type", getattr(obj, "peft_type", None)))
    fields["peft_type"] = peft_type
    spec = method_for_peft_type(str(peft_type))
    if spec is None or spec.peft is None or spec.peft.read is None:
        raise ConfigError(
            f"{type(obj).__name__} (PEFT type {peft_type!r}) is not supported: peftlab reads PEFT's "
            f"{', '.join(peft_types())}. Use one of those, or a peftlab config (peftlab.list_methods())"
        )
    heads = _PEFT_TASK_HEADS.get(str(fields.get("task_type")))
    if heads:
        fields["modules_to_save"] = list(dict.fromkeys([*(fields.get("modules_to_save") or []), *heads]))
    return spec.peft.read(fields)


def as_config(spec: "str | AdapterConfig | UnionConfig | dict | Any") -> AdapterConfig | UnionConfig:
    """Accept a config object, a dict, a method string, or a Hugging Face PEFT config object
    (converted by :func:`from_peft_config`)."""
    if isinstance(spec, (AdapterConfig, UnionConfig)):
        return spec
    if isinstance(spec, str):
        return parse_method_string(spec)
    if isinstance(spec, dict):
        return config_from_dict(spec)
    if is_peft_config(spec):
        return from_peft_config(spec)
    raise ConfigError(
        f"expected a config, a dict, a method string or a PEFT config object, got {type(spec).__name__}"
    )


def config_parts(cfg: AdapterConfig | UnionConfig) -> list[AdapterConfig]:
    """The part configs of a union, or ``[cfg]`` for a single config (a hybrid stays one part)."""
    return list(cfg.parts) if isinstance(cfg, UnionConfig) else [cfg]


def union_parts(cfg: AdapterConfig | UnionConfig) -> list[AdapterConfig]:
    """The configs placed under one adapter name: a union's parts, a hybrid's parts, else ``[cfg]``."""
    return cfg.parts() if isinstance(cfg, HybridConfig) else config_parts(cfg)


def is_union(cfg: AdapterConfig | UnionConfig) -> bool:
    """Whether ``cfg`` places several parts (a union or a hybrid): file keys then carry ``parts.<i>.``."""
    return isinstance(cfg, (UnionConfig, HybridConfig))
