"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` (DESIGN.md principle 5).

Tensor keys follow Hugging Face PEFT: ``base_model.model.<module name>.<delta key>`` (e.g.
``...q_proj.lora_A.weight``), model-level deltas save their keys bare (``prompt_embeddings``).

A directory holds three files:

``adapter_config.json``
    PEFT's config fields, for the methods PEFT also has (their registration declares a
    :class:`~peftlab.core.registry.PeftFormat`), else ``{"peft_type": "PEFTLAB"}``; plus what PEFT
    reads from the base: ``base_model_name_or_path`` (the base's ``config._name_or_path`` /
    ``name_or_path``, null if empty) and ``task_type`` (from the base class, :func:`task_type_of`;
    SEQ_CLS / TOKEN_CLS only with the classification head saved; with none, ``auto_mapping`` names
    the class, as PEFT writes it), so
    ``peft.AutoPeftModelFor...from_pretrained(dir)`` finds the base. Nothing else: PEFT warns
    ("Unexpected keyword arguments ...") about any key its config class does not have.
``peftlab_config.json``
    ``{"peftlab": <our full config>, "adapter_config_sha256": <hash of adapter_config.json>}``:
    read first, so nothing is lost on a round trip. If ``adapter_config.json`` was rewritten since
    (PEFT saving into the same directory) the hash differs and PEFT's fields are read instead, with
    a warning. Files written before this file existed kept the block under ``"peftlab"`` inside
    ``adapter_config.json``; they are still read.
``adapter_model.safetensors``
    the tensors.

Reading validates everything before the model is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from peftlab.core.config import AdapterConfig, ConfigError, UnionConfig, config_from_dict, is_union
from peftlab.core.delta import HeadCopy
from peftlab.core.peft_format import PEFT_CLS_HEADS
from peftlab.core.registry import get_method, method_for_peft_type, peft_types

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: Our own full config, beside PEFT's (see the module docstring).
PEFTLAB_CONFIG_NAME = "peftlab_config.json"
#: Every file ``save_adapter`` writes.
ADAPTER_FILES = (CONFIG_NAME, PEFTLAB_CONFIG_NAME, WEIGHTS_NAME)
PREFIX = "base_model.model."

#: Class-name endings -> PEFT's ``task_type`` (``TaskType`` in PEFT), most specific first.
_TASK_SUFFIXES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
)


class AdapterFileError(ValueError):
    """An adapter directory is missing, corrupt, or made for another base model."""


def placement_tensors(placement: list[tuple[str, Any]], cfg: AdapterConfig | UnionConfig) -> dict[str, torch.Tensor]:
    """The tensors of a placed adapter under their file keys."""
    out: dict[str, torch.Tensor] = {}
    for part, module_name, delta in placement:
        for key, value in delta.file_state().items():
            out[file_key(cfg, part, module_name, key)] = value.detach().contiguous().cpu()
    return out


#: A delta's file key that starts with this marker is adapter-level: written without the module
#: name or prefix (e.g. VeRA's projections, shared by every layer: ``base_model.vera_A``).
ADAPTER_LEVEL = "/"


def file_key(cfg: AdapterConfig | UnionConfig, part: int, module_name: str, key: str) -> str:
    """``<prefix><module>.<key>``; a union's (or a hybrid's) parts are kept apart by ``parts.<i>.``
    (a peftlab-only format). The prefix is PEFT's: ``base_model.model.`` for most methods, ``base_model.`` for the
    prompt-learning ones, whose PEFT wrapper holds the model one level higher. An
    :data:`ADAPTER_LEVEL` key is written as it is, without the marker (one delta of the adapter owns it)."""
    if key.startswith(ADAPTER_LEVEL):
        return (f"parts.{part}." if is_union(cfg) else "") + key[len(ADAPTER_LEVEL):]
    if is_union(cfg):
        return f"parts.{part}.{PREFIX}{module_name}.{key}" if module_name else f"parts.{part}.{key}"
    return f"{type(cfg).peft_module_prefix}{module_name}.{key}" if module_name else key


def task_type_of(model: Any) -> str | None:
    """PEFT's ``task_type`` for a base model, from its class: CAUSAL_LM (``*ForCausalLM``,
    ``*LMHeadModel``), SEQ_CLS, TOKEN_CLS, QUESTION_ANS, SEQ_2_SEQ_LM (an encoder-decoder's
    ``*ForConditionalGeneration``), FEATURE_EXTRACTION (a bare transformers model: ``BertModel``,
    ``LlamaModel``...); None when unknown (``*ForMaskedLM``, image classification, a plain module)."""
    if model is None:
        return None
    name = type(model).__name__
    config = getattr(model, "config", None)
    if name.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    for suffix, task in _TASK_SUFFIXES:
        if name.endswith(suffix):
            return task
    if name.endswith("Model") and "Head" not in name and getattr(config, "model_type", None):
        return "FEATURE_EXTRACTION"
    return None


def base_name_or_path(model: Any) -> str | None:
    """Where the base model came from: its ``config._name_or_path``, else its own ``name_or_path``
    (what transformers' ``from_pretrained`` records); None for an empty or missing one."""
    if model is None:
        return None
    for value in (getattr(getattr(model, "config", None), "_name_or_path", None), model.__dict__.get("name_or_path")):
        if isinstance(value, (str, os.PathLike)) and str(value):
            return str(value)
    return None


def _heads_saved(model: Any, placed: dict[str, Any] | None) -> bool:
    """Whether the adapter carries a copy of every classification head PEFT's SEQ_CLS / TOKEN_CLS
    classes wrap (modules whose name ends with ``classifier`` or ``score``): they load its weights
    from the file and fail (KeyError) without them."""
    needed = [n for n, _ in model.named_modules() if n and n.endswith(PEFT_CLS_HEADS)]
    saved = {n for n, d in (placed or {}).items() if isinstance(d, HeadCopy)}
    return bool(needed) and all(n in saved for n in needed)


def base_fields(model: Any, placed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fields of ``adapter_config.json`` that PEFT reads from the base model: ``base_model_name_or_path``,
    ``task_type`` and, without a task type, ``auto_mapping`` (the base class, as PEFT writes it), which
    ``peft.AutoPeftModel.from_pretrained`` uses to rebuild the base. SEQ_CLS / TOKEN_CLS are written
    only when the adapter saves the classification head (``placed``: {module: delta}), since PEFT's
    classes for them read its weights from the file; otherwise the task type is null."""
    task = task_type_of(model)
    if task in ("SEQ_CLS", "TOKEN_CLS") and not _heads_saved(model, placed):
        task = None
    fields: dict[str, Any] = {"base_model_name_or_path": base_name_or_path(model), "task_type": task}
    if model is not None and fields["task_type"] is None and hasattr(type(model), "from_pretrained"):
        fields["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    return fields


def config_file_dict(
    cfg: AdapterConfig | UnionConfig, placed: dict[str, Any] | None = None, base: Any = None
) -> dict[str, Any]:
    """``adapter_config.json``: PEFT's fields where PEFT has the method (``placed`` = {module: delta}
    lets the method write what only the model knows, e.g. Conv1D's ``fan_in_fan_out``), else
    ``{"peft_type": "PEFTLAB"}``; with the base model ``base``, :func:`base_fields` where the method
    left them null. Our own config is in :func:`peftlab_file_dict`."""
    peft = get_method(cfg.method).peft if isinstance(cfg, AdapterConfig) else None
    d = peft.write(cfg, placed) if peft is not None else {"peft_type": "PEFTLAB"}
    if base is not None:
        for key, value in base_fields(base, placed).items():
            if d.get(key) is None:
                d[key] = value
        if d.get("task_type") is not None:
            d.pop("auto_mapping", None)
    return d


def peftlab_file_dict(cfg: AdapterConfig | UnionConfig, config_bytes: bytes) -> dict[str, Any]:
    """``peftlab_config.json``: our full config and the hash of the ``adapter_config.json`` it goes with."""
    return {"adapter_config_sha256": hashlib.sha256(config_bytes).hexdigest(), "peftlab": cfg.to_dict()}


def serialized_size(
    cfg: AdapterConfig | UnionConfig,
    tensors: dict[str, torch.Tensor],
    placed: dict[str, Any] | None = None,
    base: Any = None,
) -> int:
    """Bytes the adapter takes on disk (exact: the same serialisers as ``save_adapter``)."""
    config, own = _config_bytes(cfg, placed, base)
    return len(save(tensors, metadata={"format": "pt"})) + len(config) + len(own)


def _json_bytes(d: dict[str, Any]) -> bytes:
    return json.dumps(d, indent=2, sort_keys=True).encode()


def _config_bytes(
    cfg: AdapterConfig | UnionConfig, placed: dict[str, Any] | None = None, base: Any = None
) -> tuple[bytes, bytes]:
    """The bytes of ``adapter_config.json`` and of ``peftlab_config.json``."""
    config = _json_bytes(config_file_dict(cfg, placed, base))
    return config, _json_bytes(peftlab_file_dict(cfg, config))


def save_adapter(
    path: str | os.PathLike,
    cfg: AdapterConfig | UnionConfig,
    tensors: dict[str, torch.Tensor],
    placed: dict[str, Any] | None = None,
    base: Any = None,
) -> None:
    """Write the three files (module docstring), each atomically (temp file + rename): an
    interrupted save leaves no half file. ``base``: the base model, for :func:`base_fields`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config, own = _config_bytes(cfg, placed, base)
    for name, writer in (
        (WEIGHTS_NAME, lambda f: save_file(tensors, f, metadata={"format": "pt"})),
        (PEFTLAB_CONFIG_NAME, lambda f: Path(f).write_bytes(own)),
        (CONFIG_NAME, lambda f: Path(f).write_bytes(config)),
    ):
        fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{name}.")
        os.close(fd)
        try:
            writer(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; adapters are meant to be shared
            os.replace(tmp, path / name)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_adapter(path: str | os.PathLike) -> tuple[AdapterConfig | UnionConfig, dict[str, torch.Tensor]]:
    """Read and validate an adapter directory (ours or Hugging Face PEFT's)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterFileError(f"adapter directory {str(path)!r} does not exist")
    cfg_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise AdapterFileError(f"{str(path)!r} has no {CONFIG_NAME}; found: {sorted(p.name for p in path.iterdir())}")
    if not weights_path.is_file():
        raise AdapterFileError(f"{str(path)!r} has no {WEIGHTS_NAME}; found: {sorted(p.name for p in path.iterdir())}")
    config_bytes = cfg_path.read_bytes()
    raw = _read_json(cfg_path, config_bytes)
    own_path = path / PEFTLAB_CONFIG_NAME
    own = _read_json(own_path, own_path.read_bytes()) if own_path.is_file() else None
    cfg = config_from_files(raw, own, config_bytes, where=cfg_path)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{weights_path} is corrupt or truncated: {e}") from e
    return cfg, tensors


def _read_json(path: Path, data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, not {type(value).__name__}")
    return value


def config_from_files(
    raw: dict[str, Any],
    own: dict[str, Any] | None = None,
    config_bytes: bytes | None = None,
    where: Any = "adapter_config.json",
) -> AdapterConfig | UnionConfig:
    """Our config from ``adapter_config.json`` (``raw``, its bytes ``config_bytes``) and
    ``peftlab_config.json`` (``own``, or None): our block first, unless ``adapter_config.json`` was
    rewritten since it was saved (PEFT's fields then win, with a warning)."""
    if own is not None:
        block = own.get("peftlab")
        if not isinstance(block, dict):
            raise AdapterFileError(f"{PEFTLAB_CONFIG_NAME} beside {where} has no 'peftlab' config block")
        sha = own.get("adapter_config_sha256")
        peft_readable = method_for_peft_type(str(raw.get("peft_type"))) is not None
        if sha is None or config_bytes is None or sha == hashlib.sha256(config_bytes).hexdigest() or not peft_readable:
            return config_from_file_dict({**raw, "peftlab": block}, where)
        warnings.warn(
            f"{where} was rewritten after {PEFTLAB_CONFIG_NAME} was saved beside it (e.g. by PEFT's save_pretrained); "
            f"reading its {raw.get('peft_type')} fields and ignoring {PEFTLAB_CONFIG_NAME}",
            stacklevel=3,
        )
        raw = {k: v for k, v in raw.items() if k != "peftlab"}
    return config_from_file_dict(raw, where)


def config_from_file_dict(raw: dict[str, Any], where: Any = "adapter_config.json") -> AdapterConfig | UnionConfig:
    """Our config from an ``adapter_config.json`` dict: peftlab's own block (``"peftlab"``, as
    files written before ``peftlab_config.json`` kept it), else a registered PEFT reader."""
    try:
        if "peftlab" in raw:
            return config_from_dict(raw["peftlab"])
        spec = method_for_peft_type(str(raw.get("peft_type")))
        if spec is not None:
            return spec.peft.read(raw)  # type: ignore[union-attr]
    except (ConfigError, TypeError, KeyError) as e:
        raise AdapterFileError(f"{where}: {e}") from e
    known = peft_types()
    raise AdapterFileError(
        f"{where}: unsupported adapter type {raw.get('peft_type')!r}; peftlab reads its own files and PEFT's {known}"
    )


def load_into_placement(
    placement: list[tuple[int, str, Any]], tensors: dict[str, torch.Tensor], cfg: AdapterConfig | UnionConfig,
    where: str = "",
) -> None:
    """Fill freshly built deltas from file tensors. Checks every key and shape first, so a file for
    another base model is refused before any delta (let alone the model) is changed."""
    expected: dict[str, tuple[int, str, str, torch.Size]] = {}
    for part, module_name, delta in placement:
        for key, value in delta.file_state().items():
            expected[file_key(cfg, part, module_name, key)] = (part, module_name, key, value.shape)
    # PEFT also saves the full weight of a targeted embedding (``<module>.base_layer.weight``); it is
    # the base's own tensor, which we never replace, so it is ignored.
    tensors = {k: v for k, v in tensors.items() if not k.endswith(".base_layer.weight")}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(
            f"adapter {where} does not fit this model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]}). Was it made for another base model?"
        )
    for k, (_, _, _, shape) in expected.items():
        if tuple(tensors[k].shape) != tuple(shape):
            raise AdapterFileError(
                f"adapter {where}: {k} has shape {tuple(tensors[k].shape)} in the file but this model needs "
                f"{tuple(shape)}. Was it made for another base model?"
            )
    for part, module_name, delta in placement:
        own = delta.file_state()
        delta.load_file_state({k: tensors[file_key(cfg, part, module_name, k)].to(v.dtype) for k, v in own.items()})
