"""The container's ``forward`` and ``generate`` show the base model's own signatures.

``PeftModel.forward(*args, adapter_names=None, **kwargs)`` accepts whatever the base accepts, but a
signature of ``*args, **kwargs`` hides the base's parameters from code that reads them. The
``transformers.Trainer`` does: it keeps only the dataset columns named in
``inspect.signature(model.forward)`` (``remove_unused_columns``) and finds the label arguments in
``inspect.signature(type(model).forward)`` (``find_labels``), which is a *class* attribute.

So ``PeftModel(model)`` builds its instance from a subclass made once per base class
(:func:`signed_subclass`), named ``PeftModel[<base class>]``, whose ``forward`` and ``generate`` only
call ``PeftModel``'s own and carry a ``__signature__``: the base class's parameters with
``adapter_names`` added as a keyword-only parameter (before ``**kwargs``). Nothing else differs;
``isinstance(pm, PeftModel)`` holds, and :func:`rebuild` lets pickle and ``copy`` recreate the
subclass from the base class.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

ADAPTER_NAMES = inspect.Parameter(
    "adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None, annotation="Sequence[str | None] | None"
)
_SELF = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)


def method_signature(cls: type, name: str) -> inspect.Signature | None:
    """The signature of ``cls.<name>`` as called on an instance (``self`` dropped), or None when
    the class has no such method or its signature cannot be read."""
    raw = inspect.getattr_static(cls, name, None)
    if raw is None or not callable(getattr(cls, name, None)):
        return None
    try:
        sig = inspect.signature(getattr(cls, name))
    except (TypeError, ValueError):
        return None
    params = list(sig.parameters.values())
    if inspect.isfunction(raw):  # a plain method: its first parameter is the instance
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            return None
        params = params[1:]
    elif not isinstance(raw, (staticmethod, classmethod)):
        return None  # some other descriptor: leave the generic signature
    return sig.replace(parameters=params)


def with_adapter_names(sig: inspect.Signature) -> inspect.Signature | None:
    """``self`` + ``sig``'s parameters + keyword-only ``adapter_names`` (before ``**kwargs``), as
    a method's ``__signature__``; None if that is not a valid signature (a parameter named self)."""
    params = list(sig.parameters.values())
    if "adapter_names" not in sig.parameters:
        at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
        params.insert(at, ADAPTER_NAMES)
    try:
        return sig.replace(parameters=[_SELF, *params])
    except ValueError:
        return None


@functools.lru_cache(maxsize=None)
def signed_subclass(peft_cls: type, base_cls: type) -> type:
    """``peft_cls`` with ``forward`` / ``generate`` signed like ``base_cls``'s (``peft_cls``
    itself when neither signature can be read). One class per base class."""
    namespace: dict[str, Any] = {
        "__module__": peft_cls.__module__, "__doc__": peft_cls.__doc__, "_signed_for": base_cls,
    }
    name = f"{peft_cls.__name__}[{base_cls.__name__}]"
    for method in ("forward", "generate"):
        base_sig = method_signature(base_cls, method)
        sig = with_adapter_names(base_sig) if base_sig is not None else None
        if sig is not None:
            namespace[method] = _signed_method(peft_cls, method, sig, f"{name}.{method}")
    if "forward" not in namespace and "generate" not in namespace:
        return peft_cls
    namespace["__qualname__"] = name
    return type(name, (peft_cls,), namespace)


def _signed_method(peft_cls: type, method: str, sig: inspect.Signature, qualname: str) -> Any:
    def call(self: Any, *args: Any, adapter_names: Any = None, **kwargs: Any) -> Any:
        return getattr(peft_cls, method)(self, *args, adapter_names=adapter_names, **kwargs)

    call.__name__, call.__qualname__, call.__doc__ = method, qualname, getattr(peft_cls, method).__doc__
    call.__module__ = peft_cls.__module__
    call.__signature__ = sig  # type: ignore[attr-defined]
    return call


def rebuild(peft_cls: type, base_cls: type | None) -> Any:
    """An empty instance of ``signed_subclass(peft_cls, base_cls)`` for pickle / ``copy`` (they
    then restore its state); ``base_cls`` None gives the plain ``peft_cls``."""
    cls = signed_subclass(peft_cls, base_cls) if base_cls is not None else peft_cls
    return object.__new__(cls)
