"""Gated prefix, ``prefix[gate=true]`` (UniPELT, Mao et al. 2022; seed 000 III-D1, seed 001 §11.3).

UniPELT scales each layer's prefix keys and values by gates computed from that layer's input. Layer
l reads

    softmax( Q [G_k^l P_k^l; K]ᵀ / √d + M ) [G_v^l P_v^l; V],
    (G_k^l, G_v^l) = mean_t σ(W_g^l v_t + b_g^l) ∈ (0, 1)²,      W_g^l ∈ R^{2×token_dim}

per row of the batch, where v_t = W_v x_t is the layer's own value projection of its input x_t at
the call's positions (all heads side by side: token_dim = kv_heads · head_dim). This is the form
implemented: the cache is the one place where the prefix meets a layer on every architecture
(Llama, GPT-2, BERT, T5), and there the layer's input arrives only through its new keys and values;
the values are the unrotated linear image of the input (UniPELT and AdapterHub read the hidden
states x_t themselves: a linear gate on W_v x is a linear gate on x within W_v's row space). The
gate is recomputed at every call from that call's positions (at each generated token: that token),
as UniPELT's code does.

How: after the prefix is stored (``prefix.py``), each self-attention layer of the cache takes a
subclass of its class whose ``update`` returns the prefix columns of this adapter multiplied by the
gates, the stored P unchanged. Several gated prefixes of one call each gate their own columns.

What a closed gate (b_g → −∞, G = 0) leaves: p zero key rows and zero value rows, which still take
softmax mass (e^0 per row) from the real keys. So closing the prefix gate does NOT give the model
without the prefix; it gives the prefix with P = 0 (exactly: ``test_hybrids.py`` checks this). It is
UniPELT's gate; an exact "off" needs a logit bias log G on the prefix columns, which the cache
cannot carry. Not with ``encoder=true`` (the T5 encoder prefix goes through hooks, not the cache);
no mixed batches here (``prepare_routed`` refuses; the serving engine gates each row in its own
batched cache instead, ``serve/virtual.py``). Files: ``prompt_embeddings`` plus ``gates.<l>.weight``
(2, token_dim) and ``gates.<l>.bias`` (2,), peftlab's own format (PEFT has no gated prefix).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from peftlab.core.config import ConfigError
from peftlab.core.gate import Gate
from peftlab.core.model_calls import cache_argument
from peftlab.methods.additive.prefix import _TAG, PrefixConfig, PrefixDelta


def gate_columns(t: torch.Tensor, start: int, end: int, g: torch.Tensor) -> torch.Tensor:
    """t (rows, heads, columns, d) with columns [start, end) multiplied by g (rows,): one row's
    prefix keys (or values) scaled by its gate, the other columns unchanged."""
    scaled = t[:, :, start:end] * g.to(t.dtype).view(-1, 1, 1, 1)
    return torch.cat([t[:, :, :start], scaled, t[:, :, end:]], dim=2)


@functools.cache
def gated_layer_class(base: type) -> type:
    """A subclass of a cache layer class whose ``update`` gates the prefix columns it was given."""

    class GatedPrefixLayer(base):  # type: ignore[misc, valid-type]
        """A cache layer that returns [G_k P_k; rest] and [G_v P_v; rest] (stores P ungated)."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            v = value_states.transpose(1, 2).flatten(2)  # (rows, new, heads·d): the layer's own values
            for start, end, gate in self.peftlab_gates:
                g = gate(v)
                keys, values = gate_columns(keys, start, end, g[:, 0]), gate_columns(values, start, end, g[:, 1])
            return keys, values

    GatedPrefixLayer.__name__ = GatedPrefixLayer.__qualname__ = f"Gated{base.__name__}"
    return GatedPrefixLayer


def gate_layer(layer: Any, start: int, end: int, gate: Gate) -> None:
    """Make cache layer ``layer`` gate its columns [start, end) by ``gate`` from now on."""
    if not hasattr(layer, "peftlab_gates"):
        layer.__class__ = gated_layer_class(type(layer))
        layer.peftlab_gates = []
    layer.peftlab_gates.append((start, end, gate))


class GatedPrefixDelta(PrefixDelta):
    """:class:`PrefixDelta` with one gate per layer on its key/value rows (module docstring)."""

    def __init__(self, cfg: PrefixConfig, model: nn.Module | None = None):
        if cfg.encoder:
            raise ConfigError("prefix: gate=true gates the prefix in the key/value cache; encoder=true is not supported")
        super().__init__(cfg, model)
        self.gates = nn.ModuleList(Gate(cfg.token_dim, 2) for _ in range(cfg.num_layers))

    def prepare(self, model: nn.Module, kwargs: dict[str, Any], generating: bool = False) -> dict[str, Any]:
        """The prefix's call (``PrefixDelta.prepare``); when this call stored the prefix, its cache
        layers are made to gate its columns."""
        name = cache_argument(model)
        before = getattr(kwargs.get(name), _TAG, None)
        kw = super().prepare(model, kwargs, generating)
        if before is not None and id(self) in before["deltas"]:
            return kw  # a continuation: the cache's layers gate already
        cache = kw[name]
        end = getattr(cache, _TAG)["length"]
        layers = (cache.self_attention_cache if hasattr(cache, "self_attention_cache") else cache).layers
        for layer, gate in zip(layers, self.gates):
            gate_layer(layer, end - self.length, end, gate)
        return kw

    @classmethod
    def prepare_routed(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Refused: a gated prefix does not batch per row."""
        raise NotImplementedError("prefix[gate=true] does not batch per row (its gates scale cache columns that a "
                                  "mixed batch aligns per row); run its rows in a separate call")

    def file_state(self) -> dict[str, torch.Tensor]:
        """``prompt_embeddings`` (P) and ``gates.<l>.weight`` / ``gates.<l>.bias``."""
        return {**super().file_state(), **{f"gates.{k}": v for k, v in self.gates.state_dict().items()}}

    def _load_checked(self, state: dict[str, torch.Tensor]) -> None:
        self.gates.load_state_dict({k[len("gates."):]: v for k, v in state.items() if k.startswith("gates.")})
        super()._load_checked({k: v for k, v in state.items() if not k.startswith("gates.")})
