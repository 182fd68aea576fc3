"""Mixed batches for LoRA and DoRA: each row of a batch uses its own adapter, in one computation.

Per hooked module the weights of every adapter of the routing are stacked once, ranks zero-padded to
the largest, with an all-zero slot for rows that use no adapter (``_stacked``); a call gathers them
per row (``_gathered``) and computes two batched matmuls (:func:`routed_lora`). Without autograd
both are kept in a :class:`~peftlab.core.delta.RecentCache` on the first delta, for the few most
recent routings, until anything they are computed from changes (``_version_key``): a decoding loop
stacks and gathers once.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from peftlab.core.delta import Delta, RecentCache
from peftlab.methods.reparam.lora.functional import without_bias


def routed_lora(deltas: Sequence[Delta | None], slot: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
    """Mixed batch as two gathered batched matmuls: row i uses (A_k, B_k, s_k) of its slot k.

    ``deltas`` are LoRA / DoRA linear deltas (or None), one per slot. Ranks are zero-padded to the
    largest one; slot -1 gathers an all-zero adapter. None (the sub-batch path) if the adapters'
    dropout rates differ."""
    present = [d for d in deltas if d is not None]
    dropout = {d.p if d.training else 0.0 for d in present}
    if len(dropout) > 1:
        return None  # different dropout rates per row: take the sub-batch path
    A_rows, B_rows, scale_rows, mag_rows = _gathered(deltas, slot, x.dtype, torch.is_grad_enabled())
    seq_shape = x.shape[1:-1]
    xf = x.reshape(x.shape[0], -1, x.shape[-1]).to(A_rows.dtype)  # (batch, tokens, in)
    if dropout != {0.0}:  # one mask over the batch is independent per row, as in the sub-batches
        xf = F.dropout(xf, dropout.pop(), training=True)
    h = torch.bmm(xf, A_rows.transpose(1, 2)) * scale_rows  # (batch, tokens, r)
    out = torch.bmm(h, B_rows.transpose(1, 2))  # (batch, tokens, out)
    if mag_rows is not None:  # DoRA rows: (m/n − 1) ⊙ W0 x + (m/n) ⊙ s B A x
        g = mag_rows  # (batch, 1, out)
        base_out = without_bias(present[0].base_layer, y).reshape(out.shape)
        out = (g - 1) * base_out + g * out
    return out.reshape(x.shape[0], *seq_shape, out.shape[-1]).to(y.dtype)


def _gathered(deltas: Sequence[Delta | None], slot: torch.Tensor, dtype: torch.dtype, grad: bool):
    """Per row: (A, B) of its slot (batch, r, in) and (batch, out, r), its scale (batch, 1, 1) and
    DoRA's magnitude ratio (batch, 1, out) or None. Without autograd the result is kept for later
    calls with the same ``slot`` tensor (the container reuses it for repeated adapter_names, so a
    decoding loop gathers once) while the stacks are unchanged."""
    stacks = _stacked(deltas, dtype, grad)
    holder = next(d for d in deltas if d is not None)
    cache = _recent(holder, "_gather_cache")
    hit = None if grad else cache.get(id(slot))
    if hit is not None and hit[0] is slot and hit[1] == slot._version and hit[2] is stacks:
        return hit[3]
    index = slot + 1
    A, B, scale, mag = stacks
    val = (
        A.index_select(0, index),
        B.index_select(0, index),
        scale.index_select(0, index).view(-1, 1, 1),
        mag.index_select(0, index).unsqueeze(1) if mag is not None else None,
    )
    if not grad:
        cache.put(id(slot), (slot, slot._version, stacks, val))  # the slot itself is held: ids stay unique
    return val


def _recent(holder: Delta, name: str) -> RecentCache:
    if name not in holder.__dict__:
        holder.__dict__[name] = RecentCache()
    return holder.__dict__[name]


def _stacked(deltas: Sequence[Delta | None], dtype: torch.dtype, grad: bool):
    """(A, B, scale, magnitude-ratio) stacked over slots with an all-zero slot 0 for base rows.

    Without autograd the stacks are kept (for the few most recent slot lists) until anything they
    are computed from changes (``_version_key``)."""
    present = [d for d in deltas if d is not None]
    key = tuple(_version_key(d) if d is not None else None for d in deltas)
    cache = _recent(present[0], "_stack_cache")
    if not grad:
        hit = cache.get(key)
        if hit is not None:
            return hit
    r = max(d.r for d in present)
    ref = present[0].lora_A.weight
    out_f, in_f = present[0].lora_B.weight.shape[0], ref.shape[1]
    zA, zB = ref.new_zeros(r, in_f), ref.new_zeros(out_f, r)
    As, Bs, scales, mags = [zA], [zB], [0.0], []
    any_dora = any(d.has_magnitude for d in present)
    ones = ref.new_ones(out_f)
    mags.append(ones)
    for d in deltas:
        if d is None:
            As.append(zA); Bs.append(zB); scales.append(0.0); mags.append(ones)  # noqa: E702
            continue
        As.append(F.pad(d.lora_A.weight, (0, 0, 0, r - d.r)))
        Bs.append(F.pad(d.lora_B.weight, (0, r - d.r)))
        scales.append(d.scaling)
        mags.append(d.magnitude_ratio() if d.has_magnitude else ones)
    val = (
        torch.stack(As),
        torch.stack(Bs),
        torch.tensor(scales, device=ref.device, dtype=ref.dtype),
        torch.stack(mags) if any_dora else None,
    )
    if not grad:
        cache.put(key, val)
    return val


def _version_key(d: Delta) -> tuple:
    """Changes whenever anything the stacks are computed from changes: A, B, and for DoRA the
    magnitude and the base weight (its norm), each by identity and in-place version."""
    # Plain dict lookups, not nn.Module attribute access: this runs for every adapter of a mixed
    # batch at every hooked module, once per decoding step.
    modules = d._modules
    tensors = [modules["lora_A"]._parameters["weight"], modules["lora_B"]._parameters["weight"]]
    if d.has_magnitude:
        tensors += [d._parameters["lora_magnitude_vector"], d.base_layer.weight]
    return (id(d), d.scaling, *[(t.data_ptr(), t._version) for t in tensors])
