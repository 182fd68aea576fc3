"""Combining trained adapters (README "Combining adapters"; DESIGN.md layer ``compose/``).

- :func:`merge`: a new adapter from weighted sums, task arithmetic, SVD truncation, TIES or DARE of
  existing ones (``merge.py``);
- :class:`Stack`, :class:`Parallel`, :class:`Average`: several adapters active at once, as a tree
  of blocks given to ``pm.set_adapter`` (``blocks.py``; also ``peftlab.Stack`` ...).
"""

from peftlab.compose.blocks import Average, Block, Parallel, Stack
from peftlab.compose.merge import METHODS, merge

__all__ = ["Average", "Block", "METHODS", "Parallel", "Stack", "merge"]
