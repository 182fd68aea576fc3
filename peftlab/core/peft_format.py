"""Targeting and ``modules_to_save`` in Hugging Face PEFT's config fields, both ways (DESIGN.md
principle 5), shared by every method that PEFT also has.

A method's PEFT writer and reader (its :class:`~peftlab.core.registry.PeftFormat`) keep their own
fields and call these for the ones PEFT spells the same way for every method:

* ``target_modules`` / ``exclude_modules`` (:func:`targets_to_peft`, :func:`exclude_to_peft`,
  :func:`targets_from_peft`). Our entries are exact names or dotted suffixes (``"q_proj"`` selects
  ``model.layers.0.self_attn.q_proj``), ``re:`` regexes (full match), or ``"all-linear"``. PEFT takes
  a list (matched as ours: the name itself or a dotted suffix), one regex string (full match), or the
  string ``"all-linear"``. A list cannot hold a regex, so entries with one ``re:`` are written as
  one regex, each plain entry ``e`` spelled ``(?:.*\\.)?<e escaped>``.
* ``layers``: PEFT's LoRA has ``layers_to_transform``, but only next to a list; others (IA3) have no
  such field. Where it cannot be used, the layers are folded into the regex as a lookahead that
  holds when the name's first all-digit part is one of them (peftlab's ``layer_index`` rule).
* feed-forward lists of IA3 (``bare_suffix=True``): PEFT matches a list entry with a plain
  ``name.endswith(entry)``, without the dot boundary, so ``output.dense`` also selects
  ``attention.output.dense``. Ours are written as a regex, and PEFT's lists read as one.
* ``modules_to_save`` (:func:`modules_to_save_to_peft`, :func:`modules_to_save_from_peft`): plain
  names only in PEFT. With ``task_type`` SEQ_CLS / TOKEN_CLS, PEFT adds both ``classifier`` and
  ``score`` (:data:`PEFT_CLS_HEADS`), whichever the model has; read back, the pair becomes the one
  entry :data:`CLS_HEAD_ENTRY` that matches either, and is written back as the pair.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from torch import nn

from peftlab.core.config import ConfigError
from peftlab.core.delta import HeadCopy
from peftlab.core.targeting import entry_matches

#: The classification heads PEFT's ``task_type`` SEQ_CLS / TOKEN_CLS adds to ``modules_to_save``.
PEFT_CLS_HEADS = ("classifier", "score")
#: Our entry for that pair: one ``modules_to_save`` entry matching either head.
CLS_HEAD_ENTRY = r"re:(?:.*\.)?(?:classifier|score)"
#: PEFT's shorthand for every linear layer but the output head (also ours).
ALL_LINEAR = "all-linear"


def entry_regex(entry: str) -> str:
    """A regex (full match) selecting the same module names as one targeting entry: a ``re:``
    entry's own pattern, else the name or any dotted name ending in ``.<entry>``."""
    return entry[3:] if entry.startswith("re:") else rf"(?:.*\.)?{re.escape(entry)}"


def layers_lookahead(layers: list[int]) -> str:
    """A regex lookahead that holds when a name's first all-digit part is in ``layers`` (peftlab's
    ``layers`` rule; leading zeros allowed), to prefix to a full-match pattern."""
    alts = "|".join(str(i) for i in sorted(set(layers)))
    return rf"(?=(?:[^.]*[^.0-9][^.]*\.|\.)*0*(?:{alts})(?:\.|$))"


def targets_to_peft(
    entries: list[str] | None,
    layers: list[int] | None = None,
    *,
    layers_field: bool = True,
    bare_suffix: bool = False,
) -> list[str] | str | None:
    """Our targeting entries (restricted to ``layers``) as PEFT's ``target_modules``-style value.

    * None stays None (the method's defaults apply), an empty list stays empty;
    * ``["all-linear"]`` is PEFT's ``"all-linear"`` (with ``layers`` only if ``layers_field``:
      PEFT's ``layers_to_transform`` then restricts it); ``"all-linear"`` next to other entries, or
      with ``layers`` and no layers field, raises ConfigError: PEFT has no way to say it;
    * plain entries are written as the list itself when PEFT matches lists as we do
      (not ``bare_suffix``) and the layers, if any, go to PEFT's own field (``layers_field``);
    * otherwise one regex: the ``layers`` lookahead (if any) and the alternatives of
      :func:`entry_regex`. The caller must then leave ``layers_to_transform`` unset: PEFT refuses
      it next to a regex.

    ``bare_suffix``: the PEFT field matches list entries with ``name.endswith(entry)`` (IA3's
    ``feedforward_modules``), so a list would select more than our entries do: always a regex.
    """
    if entries is None:
        return None
    if not entries:
        return []
    folded = bool(layers) and not layers_field
    if ALL_LINEAR in entries and not bare_suffix:
        if entries == [ALL_LINEAR] and not folded:
            return ALL_LINEAR
        also = "other entries" if layers_field else "other entries or layers"
        raise ConfigError(f"targets: 'all-linear' cannot be combined with {also} in a PEFT file")
    if not bare_suffix and not folded and not any(e.startswith("re:") for e in entries):
        return list(entries)
    look = layers_lookahead(layers) if layers else ""
    return look + "(?:" + "|".join(entry_regex(e) for e in entries) + ")"


def exclude_to_peft(entries: list[str] | None) -> list[str] | str | None:
    """PEFT's ``exclude_modules``: None for no exclusion (None or empty), else the entries written
    as :func:`targets_to_peft` writes targets (no layers)."""
    return targets_to_peft(entries) if entries else None


def targets_from_peft(value: Any, *, bare_suffix: bool = False) -> list[str] | None:
    """PEFT's ``target_modules``-style value as our entries (the inverse of :func:`targets_to_peft`).

    None stays None; the string ``"all-linear"`` (any case, as PEFT compares it) is ``["all-linear"]``;
    any other string is a regex, ``["re:<it>"]``; a list is its names, sorted and unique (PEFT keeps
    them as a set, so the file's order means nothing). With ``bare_suffix`` (PEFT matches the list
    with ``name.endswith(entry)``), a non-empty list becomes one regex entry with that meaning.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return [ALL_LINEAR] if value.lower() == ALL_LINEAR else ["re:" + value]
    names = sorted(set(value))
    if bare_suffix:
        return ["re:.*(?:" + "|".join(re.escape(e) for e in names) + ")"] if names else []
    return names


def modules_to_save_to_peft(
    entries: list[str] | None, placed: Mapping[str, nn.Module] | None = None
) -> list[str] | None:
    """Our ``modules_to_save`` as PEFT's (plain names, matched as dotted suffixes: no regex).

    :data:`CLS_HEAD_ENTRY` is written as PEFT's pair :data:`PEFT_CLS_HEADS`; another ``re:`` entry,
    given ``placed`` (module name -> delta of the placed adapter), as the names of the head copies
    it selected (else as is, which PEFT will not match); plain names as they are. Unique, in order.
    """
    if entries is None:
        return None
    out: list[str] = []
    for e in entries:
        if e == CLS_HEAD_ENTRY:
            out += PEFT_CLS_HEADS
        elif e.startswith("re:") and placed is not None:
            out += [n for n, d in placed.items() if isinstance(d, HeadCopy) and entry_matches(e, n)]
        else:
            out.append(e)
    return list(dict.fromkeys(out))


def modules_to_save_from_peft(fields: Mapping[str, Any]) -> list[str] | None:
    """PEFT's ``modules_to_save`` (read from its config ``fields``) as ours: unique names in order,
    None if there are none; with ``task_type`` SEQ_CLS / TOKEN_CLS, the pair :data:`PEFT_CLS_HEADS`
    becomes the one entry :data:`CLS_HEAD_ENTRY` (last), since PEFT writes both whichever the model has."""
    names = list(dict.fromkeys(fields.get("modules_to_save") or [])) or None
    if names and fields.get("task_type") in ("SEQ_CLS", "TOKEN_CLS") and all(h in names for h in PEFT_CLS_HEADS):
        names = [n for n in names if n not in PEFT_CLS_HEADS] + [CLS_HEAD_ENTRY]
    return names
