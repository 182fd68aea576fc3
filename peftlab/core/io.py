"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors`` (DESIGN.md principle 5).

Tensor keys follow Hugging Face PEFT: ``base_model.model.<module name>.<delta key>`` (e.g.
``...q_proj.lora_A.weight``), model-level deltas save their keys bare (``prompt_embeddings``).
Methods that PEFT also has write PEFT's config fields (their registration declares a
:class:`~peftlab.core.registry.PeftFormat`); the full peftlab config is kept under the extra key
``"peftlab"`` so nothing is lost on a round trip.
Reading validates everything before the model is touched.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save, save_file

from peftlab.core.config import AdapterConfig, ConfigError, UnionConfig, config_from_dict
from peftlab.core.registry import get_method, method_for_peft_type, peft_types

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


class AdapterFileError(ValueError):
    """An adapter directory is missing, corrupt, or made for another base model."""


def placement_tensors(placement: list[tuple[str, Any]], cfg: AdapterConfig | UnionConfig) -> dict[str, torch.Tensor]:
    """The tensors of a placed adapter under their file keys."""
    out: dict[str, torch.Tensor] = {}
    for part, module_name, delta in placement:
        for key, value in delta.file_state().items():
            out[file_key(cfg, part, module_name, key)] = value.detach().contiguous().cpu()
    return out


def file_key(cfg: AdapterConfig | UnionConfig, part: int, module_name: str, key: str) -> str:
    """``<prefix><module>.<key>``; a union's parts are kept apart by ``parts.<i>.`` (a peftlab-only
    format). The prefix is PEFT's: ``base_model.model.`` for most methods, ``base_model.`` for the
    prompt-learning ones, whose PEFT wrapper holds the model one level higher."""
    if isinstance(cfg, UnionConfig):
        return f"parts.{part}.{PREFIX}{module_name}.{key}" if module_name else f"parts.{part}.{key}"
    return f"{type(cfg).peft_module_prefix}{module_name}.{key}" if module_name else key


def config_file_dict(cfg: AdapterConfig | UnionConfig, placed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON config: PEFT's fields where PEFT has the method (``placed`` = {module: delta} lets
    the method write what only the model knows, e.g. Conv1D's ``fan_in_fan_out``), plus ours."""
    peft = get_method(cfg.method).peft if isinstance(cfg, AdapterConfig) else None
    d = peft.write(cfg, placed) if peft is not None else {"peft_type": "PEFTLAB"}
    d["peftlab"] = cfg.to_dict()
    return d


def serialized_size(
    cfg: AdapterConfig | UnionConfig, tensors: dict[str, torch.Tensor], placed: dict[str, Any] | None = None
) -> int:
    """Bytes the adapter takes on disk (exact: the same serialisers as ``save_adapter``)."""
    return len(save(tensors, metadata={"format": "pt"})) + len(_config_bytes(cfg, placed))


def _config_bytes(cfg: AdapterConfig | UnionConfig, placed: dict[str, Any] | None = None) -> bytes:
    return json.dumps(config_file_dict(cfg, placed), indent=2, sort_keys=True).encode()


def save_adapter(
    path: str | os.PathLike,
    cfg: AdapterConfig | UnionConfig,
    tensors: dict[str, torch.Tensor],
    placed: dict[str, Any] | None = None,
) -> None:
    """Write both files atomically (temp file + rename): an interrupted save leaves no half file."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, writer in (
        (WEIGHTS_NAME, lambda f: save_file(tensors, f, metadata={"format": "pt"})),
        (CONFIG_NAME, lambda f: Path(f).write_bytes(_config_bytes(cfg, placed))),
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
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{cfg_path} is not valid JSON: {e}") from e
    cfg = config_from_file_dict(raw, cfg_path)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{weights_path} is corrupt or truncated: {e}") from e
    return cfg, tensors


def config_from_file_dict(raw: dict[str, Any], where: Any = "adapter_config.json") -> AdapterConfig | UnionConfig:
    """Our config from an ``adapter_config.json`` dict: peftlab's own block, else a registered PEFT reader."""
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
