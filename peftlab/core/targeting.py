"""Choosing the modules an adapter is placed on, the same way for every method.

Rules (see :class:`peftlab.core.config.AdapterConfig`): an entry matches a module whose full name
equals it or ends with ``"." + entry``; ``re:<regex>`` is a full match on the name; ``all-linear``
is every linear layer (``nn.Linear``, 4-bit ``Linear4bit``, GPT-2's ``Conv1D``) except the output head. Then
``layers``, ``module_types`` and ``exclude`` filter the result.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable

from torch import nn

from peftlab.core.config import AdapterConfig

# Output heads are never adapted by "all-linear": they map to the task's label or vocabulary space.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "head", "output_layer", "embed_out")


class TargetError(ValueError):
    """No module (or a wrong module) matched the requested targets."""


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` (bitsandbytes' 4-bit ``Linear4bit`` is one: a quantized base is targeted as the
    float one was) or a transposed ``Conv1D`` (GPT-2), recognised by class name to avoid imports."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _is_head(name: str) -> bool:
    return any(name == h or name.endswith("." + h) or name.startswith(h + ".") for h in HEAD_NAMES)


def entry_matches(entry: str, name: str) -> bool:
    """Whether one targeting entry selects the module called ``name``."""
    if entry.startswith("re:"):
        return re.fullmatch(entry[3:], name) is not None
    return name == entry or name.endswith("." + entry)


def layer_index(name: str) -> int | None:
    """The block index of a module: the first purely numeric part of its dotted name."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _nearest(wanted: str, names: Iterable[str]) -> list[str]:
    """Up to five existing names (leaf names such as ``q_proj`` and full names) closest to
    ``wanted``, each listed once; the first leaf names when none is close."""
    names = list(names)
    leaves = sorted({n.split(".")[-1] for n in names if n})
    key = wanted[3:] if wanted.startswith("re:") else wanted
    # A top-level module is both a leaf and a full name: offer it once.
    candidates = list(dict.fromkeys(leaves + [n for n in names if n]))
    close = difflib.get_close_matches(key, candidates, n=5, cutoff=0.3)
    return close or leaves[:8]


def inside_any(name: str, entries: list[str]) -> bool:
    """Whether module ``name`` is, or lies inside, a module matched by one of ``entries``."""
    parts = name.split(".")
    prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
    return any(entry_matches(e, p) for e in entries for p in prefixes)


def select_modules(
    model: nn.Module,
    cfg: AdapterConfig,
    default: list[str] | None = None,
    accept: "callable | None" = None,
    what: str = "module",
) -> dict[str, nn.Module]:
    """Resolve ``cfg``'s targeting fields against ``model``.

    ``default`` is used when ``cfg.targets`` is None. ``accept(module)`` filters module kinds the
    method can handle (e.g. linear layers for LoRA); a module that was named explicitly but cannot
    be handled is an error rather than silently skipped.
    Returns ``{full_name: module}`` in model order; raises :class:`TargetError` listing the nearest
    existing names when nothing matches.
    """
    targets = cfg.targets if cfg.targets is not None else default
    if not targets:
        raise TargetError(f"{cfg.method}: no targets given and the method has no default targets")
    all_named = [(n, m) for n, m in model.named_modules() if n]
    chosen: dict[str, nn.Module] = {}
    unmatched: list[str] = []
    for entry in targets:
        if entry == "all-linear":
            hits = [(n, m) for n, m in all_named if is_linear(m) and not _is_head(n)]
        else:
            hits = [(n, m) for n, m in all_named if entry_matches(entry, n)]
        if not hits:
            unmatched.append(entry)
        for n, m in hits:
            chosen[n] = m
    if unmatched and cfg.targets is not None:
        entry = unmatched[0]
        near = _nearest(entry, [n for n, _ in all_named])
        raise TargetError(
            f"{cfg.method}: target {entry!r} matches no module of {type(model).__name__}. "
            f"Nearest module names: {', '.join(near)}"
        )
    if cfg.layers is not None:
        chosen = {n: m for n, m in chosen.items() if layer_index(n) in cfg.layers}
    if cfg.module_types is not None:
        chosen = {n: m for n, m in chosen.items() if type(m).__name__ in cfg.module_types}
    if cfg.exclude:
        chosen = {n: m for n, m in chosen.items() if not any(entry_matches(e, n) for e in cfg.exclude)}
    if accept is not None:
        bad = [n for n, m in chosen.items() if not accept(m)]
        explicit = cfg.targets is not None and "all-linear" not in (cfg.targets or [])
        if bad and explicit and len(bad) == len(chosen):
            raise TargetError(
                f"{cfg.method}: {bad[0]!r} is a {type(chosen[bad[0]]).__name__}, which this method cannot adapt "
                f"(it needs a {what})"
            )
        chosen = {n: m for n, m in chosen.items() if accept(m)}
    saved = getattr(cfg, "modules_to_save", None)
    if saved and chosen:  # as PEFT: a module that gets a trainable copy is never also adapted
        chosen = {n: m for n, m in chosen.items() if not inside_any(n, saved)}
        if not chosen:
            raise TargetError(f"{cfg.method}: every target is inside modules_to_save={saved}")
    if not chosen:
        raise TargetError(
            f"{cfg.method}: the targeting fields select no {what} "
            f"(targets={targets}, layers={cfg.layers}, module_types={cfg.module_types}, exclude={cfg.exclude})"
        )
    # Model order, not the order of the entries, so saved files are deterministic.
    order = {n: i for i, (n, _) in enumerate(all_named)}
    return dict(sorted(chosen.items(), key=lambda kv: order[kv[0]]))
