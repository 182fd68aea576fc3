"""DESIGN.md's layering, read from the source: a lower layer never imports a higher one, the core
never imports the methods (importing ``peftlab`` registers them), and the container and the
accounting do not import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "peftlab"
#: From the bottom. The root package ``peftlab`` (the public API: core + methods + zoo) counts as
#: the layer just above the methods and the zoo.
LAYERS = ["core", "methods", "compose", "quant", "zoo", "<api>", "train", "bench", "serve", "cli"]


def _layer_of(module: str) -> str:
    parts = module.split(".")
    if parts == ["peftlab"] or parts[1:2] == ["__init__"]:
        return "<api>"
    return parts[1] if parts[1] in LAYERS else "<api>"


def _imports(path: Path) -> list[str]:
    """Absolute names of the peftlab modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                names.append(node.module)
    return [n for n in names if n == "peftlab" or n.startswith("peftlab.")]


SOURCES = sorted(p for p in ROOT.rglob("*.py") if p.parent != ROOT)


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_no_layer_imports_a_higher_one(path):
    own = path.relative_to(ROOT).parts[0]
    assert own in LAYERS, f"peftlab/{own} is not a layer of DESIGN.md: add it to LAYERS in its place"
    for name in _imports(path):
        target = _layer_of(name)
        assert LAYERS.index(target) <= LAYERS.index(own) or target == own, f"{path.name} ({own}) imports {name}"


def test_core_never_imports_methods_and_model_accounting_are_apart():
    for path in (ROOT / "core").rglob("*.py"):
        assert not any(n.startswith("peftlab.methods") for n in _imports(path)), path
    assert "peftlab.core.model" not in _imports(ROOT / "core" / "accounting.py")
    model_imports = _imports(ROOT / "core" / "model.py")
    assert "peftlab.core.accounting" in model_imports  # the container reports through it, one way only
