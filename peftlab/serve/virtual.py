"""What an adapter puts before a request's prompt, served per row in the shared batch.

Two kinds of model-site parts rewrite a call rather than a layer, so the engine serves them itself
(the adapter's layer parts, if any, still go to the bank or to per-row routing):

* **prefixes** (prefix tuning, P-tuning v2, MAM's prefix, UniPELT's gated prefix): each layer's
  (P_k, P_v) are written into the request's own cache row, columns 0..p−1, before its prompt, whose
  tokens sit at positions p + j (``offset_positions``, PEFT's numbering) or j (``offset_positions=
  false``: :attr:`VirtualInput.position_shift`). Several prefixes of one union are concatenated in
  placement order, [P_a; P_b], as the library's ``prepare`` stores them.
* **soft prompts** (prompt tuning, P-tuning): the l virtual-token embeddings P are a constant at
  inference (P-tuning's encoder output is what the adapter file holds: ``PromptDelta`` computes it
  once, and loading keeps only P), so a request's prefill reads [P; E(x)] as if P were l prompt
  tokens at positions 0..l−1 (``prompt.py``'s numbering); the cache row then holds them like
  prompt tokens and decoding needs nothing more.

A gated prefix (UniPELT, ``prefix_gate.py``) is served exactly per row: every call, each row's
prefix columns are scaled, in what attention reads (the stored P stays as it is), by that row's
own gates G = mean_t σ(W_g v_t + b_g) over the call's new positions of that row, v_t the layer's
values (:class:`CallGates`). A row's mean must not include padding: the engine prefills a gated row
only in a group where no prompt is longer than its own (``Engine._prefill_groups``).

What is refused, with the reason (:func:`check_virtual_parts`): prefixes of one union that number
the prompt differently (``offset_positions`` true in one, false in another), ``encoder=true`` (a T5
encoder's prefix: the engine serves decoder-only models), two soft prompts
or a soft prompt together with a prefix in one union (the library itself does not run those in one
generate), and a soft prompt together with gated layers (the library runs P in a call of its own, so
a gate's mean over the positions would differ from one prefill over [P; x]).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from peftlab.core.config import union_parts
from peftlab.core.gate import GatedDelta, routed_gate_value
from peftlab.core.registry import get_method
from peftlab.methods.additive.prefix import PrefixConfig, PrefixDelta
from peftlab.methods.additive.prefix_gate import GatedPrefixDelta
from peftlab.methods.additive.prompt import PromptDelta
from peftlab.methods.additive.virtual_tokens import VirtualTokensConfig

from .errors import InvalidAdapterError


@dataclass
class PrefixGates:
    """One adapter's gated prefix columns: segment s covers columns [starts[s], ends[s]) of the
    prefix and has, per layer, W_g (2, kv_dim) and b_g (2,), stacked as ``weight`` (layers, S, 2,
    kv_dim) and ``bias`` (layers, S, 2); gate 0 scales the keys, gate 1 the values."""

    starts: list[int]
    ends: list[int]
    weight: torch.Tensor
    bias: torch.Tensor


@dataclass
class VirtualInput:
    """An adapter's model-site parts (module docstring): ``prefix`` per layer (P_k, P_v), each
    (kv heads, p, head dim), with ``gates`` on some of its columns; ``prompt`` P (l, d)."""

    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    gates: PrefixGates | None = None
    prompt: torch.Tensor | None = None
    restart_positions: bool = False  # the prompt's tokens are numbered from 0 after the prefix

    @property
    def prefix_length(self) -> int:
        """p: cache columns the prefix fills before the request's first token."""
        return 0 if self.prefix is None else int(self.prefix[0][0].shape[1])

    @property
    def prompt_length(self) -> int:
        """l: virtual tokens prefilled before the request's prompt."""
        return 0 if self.prompt is None else int(self.prompt.shape[0])

    @property
    def position_shift(self) -> int:
        """Cache columns minus position of a request's tokens: p with ``offset_positions=false``, else 0."""
        return self.prefix_length if self.restart_positions else 0

    @property
    def length(self) -> int:
        """Positions a request of this adapter occupies before its prompt."""
        return self.prefix_length + self.prompt_length

    def nbytes(self) -> int:
        """Bytes of its tensors."""
        tensors = [t for kv in self.prefix or [] for t in kv]
        if self.prompt is not None:
            tensors.append(self.prompt)
        if self.gates is not None:
            tensors += [self.gates.weight, self.gates.bias]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device) -> "VirtualInput":
        """A copy on ``device``."""
        gates = None if self.gates is None else replace(self.gates, weight=self.gates.weight.to(device),
                                                        bias=self.gates.bias.to(device))
        return VirtualInput(None if self.prefix is None else [(k.to(device), v.to(device)) for k, v in self.prefix],
                            gates, None if self.prompt is None else self.prompt.to(device), self.restart_positions)


def check_virtual_parts(cfg: Any, where: str) -> bool:
    """Refuse (:class:`InvalidAdapterError`, with the reason) a config whose model-site parts the
    engine cannot serve exactly (module docstring); whether it has any model-site part."""
    parts = union_parts(cfg)
    virtual = [p for p in parts if "model" in get_method(p.method).sites]
    prefixes = [p for p in virtual if isinstance(p, PrefixConfig)]
    prompts = [p for p in virtual if not isinstance(p, PrefixConfig)]

    def refuse(why: str) -> InvalidAdapterError:
        return InvalidAdapterError(f"adapter {where} ({cfg.method}) cannot be served by the engine: {why}. "
                                   "Run it with peftlab.load(model, dir).generate(...)")

    for p in virtual:
        if not isinstance(p, VirtualTokensConfig):
            raise refuse(f"its part {p.method} rewrites the model call in a way the engine does not batch (the engine "
                         "serves prefixes and soft prompts among the model-level methods)")
    for p in prefixes:
        if p.encoder:
            raise refuse("prefix[encoder=true] prefixes the encoder of an encoder-decoder; the engine serves "
                         "decoder-only causal LMs")
    if len({p.offset_positions for p in prefixes}) > 1:
        raise refuse("its prefixes number the prompt differently (offset_positions true in one, false in another)")
    if len(prompts) > 1 or (prompts and prefixes):
        raise refuse("a union of several soft prompts, or of a soft prompt and a prefix, is not something the "
                     "library's generate runs either")
    if prompts and any(getattr(p, "gate", False) for p in parts):
        raise refuse("a soft prompt with gated layers: the library runs the virtual tokens in a call of their own, "
                     "so a gate's mean over the positions differs from one prefill over [P; x]")
    return bool(virtual)


def virtual_input(placement: list, model: nn.Module) -> VirtualInput | None:
    """The model-site parts of a built, filled placement, in the model's dtype, on the CPU (None if
    it has none). Call :func:`check_virtual_parts` on its config first."""
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    prefixes = [d for _, _, d in placement if isinstance(d, PrefixDelta)]
    prompts = [d for _, _, d in placement if isinstance(d, PromptDelta)]
    if not prefixes and not prompts:
        return None
    out = VirtualInput()
    with torch.no_grad():
        if prompts:
            (delta,) = prompts
            out.prompt = delta.prompts()[: delta.length].detach().to(dtype).contiguous().cpu()
        if prefixes:
            per_delta = [[(k[0], v[0]) for k, v in d.layer_kv(d.prefix().detach(), 1, dtype)] for d in prefixes]
            out.prefix = [(torch.cat([kv[layer][0] for kv in per_delta], dim=1).contiguous().cpu(),
                           torch.cat([kv[layer][1] for kv in per_delta], dim=1).contiguous().cpu())
                          for layer in range(len(per_delta[0]))]
            out.gates = _prefix_gates(prefixes)
            out.restart_positions = not prefixes[0].offset
    return out


def _prefix_gates(prefixes: list[PrefixDelta]) -> PrefixGates | None:
    starts, ends, weights, biases, column = [], [], [], [], 0
    for d in prefixes:
        if isinstance(d, GatedPrefixDelta):
            starts.append(column)
            ends.append(column + d.length)
            weights.append(torch.stack([g.weight.detach() for g in d.gates]))  # (layers, 2, kv_dim)
            biases.append(torch.stack([g.bias.detach() for g in d.gates]))
        column += d.length
    if not starts:
        return None
    return PrefixGates(starts, ends, torch.stack(weights, 1).cpu(), torch.stack(biases, 1).cpu())


@contextlib.contextmanager
def soft_prompts_in(embedding: nn.Module, virtuals: list[VirtualInput | None]) -> Iterator[None]:
    """Inside: the input embedding's output, row b, columns 0..l_b−1, is row b's soft prompt P_b
    (the prompt tuning input [P; E(x)] of ``prompt.py``; what the embedding computed for the pad
    ids there is dropped). The hook is added last, so it runs after any adapter's hook on the
    embedding, as P replaces E there in the library too."""
    if not any(v is not None and v.prompt is not None for v in virtuals):
        yield
        return

    def put(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for b, v in enumerate(virtuals):
            if v is not None and v.prompt is not None:
                output[b, : v.prompt_length] = v.prompt.to(output.dtype)
        return output

    handle = embedding.register_forward_hook(put)
    try:
        yield
    finally:
        handle.remove()


def has_gated_layers(placement: list) -> bool:
    """Whether a placement's layer deltas carry gates averaged over a call's positions."""
    return any(isinstance(d, GatedDelta) for _, _, d in placement)


@dataclass
class CallGates:
    """The gated prefix segments of one model call's rows, stacked: segment m belongs to row
    ``rows[m]`` and covers its cache columns [starts[m], ends[m]); ``weight`` (layers, M, 2, kv_dim),
    ``bias`` (layers, M, 2)."""

    rows: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def of(cls, per_row: list[PrefixGates | None], device: torch.device) -> "CallGates | None":
        """The call's gates from each row's (None: an ungated row); None when no row has any."""
        rows, starts, ends, weights, biases = [], [], [], [], []
        for b, g in enumerate(per_row):
            if g is None:
                continue
            rows += [b] * len(g.starts)
            starts += g.starts
            ends += g.ends
            weights.append(g.weight)
            biases.append(g.bias)
        if not rows:
            return None
        as_tensor = lambda xs: torch.tensor(xs, device=device)  # noqa: E731
        return cls(as_tensor(rows), as_tensor(starts), as_tensor(ends), torch.cat(weights, 1), torch.cat(biases, 1))

    def scale(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
              new_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What attention reads in layer ``layer``: keys and values (rows, heads, columns, d) with each
        gated segment's columns multiplied by its row's gates

            G = mean_t σ(W_g v_t + b_g),  v_t = the row's new values of this call (heads side by side)

        (``core.gate.routed_gate_value``, as ``prefix_gate.py`` computes them for one row alone)."""
        v = new_values.index_select(0, self.rows).transpose(1, 2).flatten(2)  # (M, new, kv_dim)
        g = routed_gate_value(self.weight[layer], self.bias[layer], v)  # (M, 2)
        columns = torch.arange(keys.shape[2], device=keys.device)
        inside = (columns >= self.starts[:, None]) & (columns < self.ends[:, None])  # (M, columns)
        shape = (keys.shape[0], keys.shape[2])
        covered = torch.zeros(shape, device=keys.device).index_add_(0, self.rows, inside.float()) > 0
        factors = []
        for i in (0, 1):  # per row: G on its segments' columns (disjoint: one term per column), 1 elsewhere
            segment = torch.where(inside, g[:, i : i + 1].to(keys.dtype), 0)
            summed = torch.zeros(shape, dtype=keys.dtype, device=keys.device).index_add_(0, self.rows, segment)
            factors.append(torch.where(covered, summed, 1))
        return keys * factors[0][:, None, :, None], values * factors[1][:, None, :, None]
