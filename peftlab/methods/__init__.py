"""Every method family; importing this package registers each method (see core/registry.py)."""

from peftlab.methods import additive, hybrid, reparam, selective  # noqa: F401
