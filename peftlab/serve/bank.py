"""The adapter bank: every resident LoRA-family adapter's weights, stacked once, gathered per row.

Layout (:class:`BankLayout`): each adapter is one flat row of P numbers holding, for every hooked
module m, Aᵀ_m (in_m × R), then for every module Bᵀ_m (R × out_m): ranks zero-padded to the bank's
rank R, the scaling folded into B, P padded to a multiple of every out_m when that is cheap. The
bank on the compute device is a (slots + 1, P) tensor whose row 0 is all zeros (rows that use no
bank adapter). Loading an adapter into a slot is one copy of its flat row; a new module or a larger
rank re-lays the bank once, at load time, never per call.

A call (:meth:`AdapterBank.call`) gives each row its slot; each hooked module then adds, per row i
with slot s_i (Punica's SGMV idea: one pass whatever the mix of adapters and ranks),

    y_i += B_{s_i} (A_{s_i} x_i)

* decoding (one token per row): two ``embedding_bag`` calls over the bank itself, seen as rows of R
  numbers (h_i = Σ_j x_ij Aᵀ_{s_i}[j]) and as rows of out_m numbers (Δy_i = Σ_r h_ir Bᵀ_{s_i}[r]):
  each row reads exactly its adapter's weights and nothing is copied;
* prefill (many tokens per row): the rows' flat rows are gathered once per call (one
  ``index_select`` shared by every module), then two batched matmuls per module.

A call where no row uses the bank skips the hooks. A fused step (:mod:`~peftlab.serve.fused`)
packs many requests' tokens into one row; it is routed per token (``per_token=True``: ``slots[k]``
is token k's bank row) through the decode path, each token being a one-token row.

dLoRA merging (:meth:`AdapterBank.merge`): one slot's ΔW = B A is added into the base weights (the
originals are kept and restored exactly by :meth:`unmerge`). Its rows then map to row 0 and cost
nothing; every other row subtracts that adapter's term, x Aᵀ Bᵀ (one low-rank matmul over the
batch), so outputs are unchanged whatever the mix, and a batch of that adapter alone runs at the
base model's speed.

The bank's hooks are prepended, so they run before the library's own dispatcher hooks on the same
module (an (IA)³ scale on a row then sees the base output with the merged term already removed).
"""

from __future__ import annotations

import contextlib
import functools
import math
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.layers import is_adaptable_layer, layer_info, to_module_layout

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True, eq=False)
class BankLayout:
    """Where each module's factors sit in an adapter's flat row (see the module docstring): first
    every module's Aᵀ (in × R), then every module's Bᵀ (R × out), so all offsets are multiples of R
    and the B part of a row is one block."""

    rank: int
    #: module name -> (in_features, out_features), in layout order
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __eq__(self, other: object) -> bool:  # the order of the modules matters (their offsets)
        return isinstance(other, BankLayout) and (self.rank, list(self.shapes.items())) == (other.rank, list(other.shapes.items()))

    def __hash__(self) -> int:
        return hash((self.rank, tuple(self.shapes.items())))

    @functools.cached_property
    def offsets(self) -> dict[str, tuple[int, int]]:
        """module -> (offset of Aᵀ, offset of Bᵀ) in the flat row."""
        out, a, b = {}, 0, self.b_start
        for name, (fin, fout) in self.shapes.items():
            out[name] = (a, b)
            a += self.rank * fin
            b += self.rank * fout
        return out

    @property
    def b_start(self) -> int:
        """Where the Bᵀ block starts."""
        return self.rank * sum(fin for fin, _ in self.shapes.values())

    @functools.cached_property
    def size(self) -> int:
        """P, the length of a flat row: the factors, padded to a multiple of every module's output
        size when that costs little (then each module's Bᵀ rows of all slots form one strided table:
        :meth:`b_table`)."""
        used = sum(self.rank * (fin + fout) for fin, fout in self.shapes.values())
        multiple = math.lcm(self.rank, *(fout for _, fout in self.shapes.values()))
        padded = -(-used // multiple) * multiple
        return padded if padded - used <= used // 8 else used

    def b_table(self, flat: torch.Tensor, module: str) -> torch.Tensor | None:
        """Every slot's Bᵀ rows of ``module`` as one (rows, out) table (a view of the bank ``flat``,
        (slots, P)), row ``s · P/out + r`` being slot s's Bᵀ row r; None when P is no multiple of out."""
        _, fout = self.shapes[module]
        if self.size % fout:
            return None
        b = self.offsets[module][1]
        return flat.as_strided(((flat.numel() - b) // fout, fout), (fout, 1), flat.storage_offset() + b)

    def covers(self, factors: Factors) -> bool:
        """Whether adapters with these factors fit without re-laying the bank."""
        return all(m in self.shapes and A.shape[0] <= self.rank for m, (A, _) in factors.items())

    def extended(self, factors: Factors) -> "BankLayout":
        """The smallest layout holding this one and ``factors``."""
        shapes = dict(self.shapes)
        for m, (A, B) in factors.items():
            shapes.setdefault(m, (A.shape[1], B.shape[0]))
        return BankLayout(max([self.rank, *(A.shape[0] for A, _ in factors.values())]), shapes)

    def views(self, flat: torch.Tensor, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(Aᵀ, Bᵀ) of ``module`` in flat rows ``flat`` (..., P): views (..., in, R) and (..., R, out)."""
        fin, fout = self.shapes[module]
        a, b = self.offsets[module]
        lead = flat.shape[:-1]
        return (flat[..., a : a + fin * self.rank].view(*lead, fin, self.rank),
                flat[..., b : b + self.rank * fout].view(*lead, self.rank, fout))

    def b_views(self, b_block: torch.Tensor, module: str) -> torch.Tensor:
        """Bᵀ of ``module`` in rows of the Bᵀ block only (..., P − b_start): a view (..., R, out)."""
        _, fout = self.shapes[module]
        b = self.offsets[module][1] - self.b_start
        return b_block[..., b : b + self.rank * fout].view(*b_block.shape[:-1], self.rank, fout)

    def pack(self, factors: Factors, dtype: torch.dtype, pin: bool = False) -> torch.Tensor:
        """One adapter's flat row (zeros for modules it does not touch and for padded ranks)."""
        flat = torch.zeros(self.size, dtype=dtype, pin_memory=pin)
        for m, (A, B) in factors.items():
            at, bt = self.views(flat, m)
            at[:, : A.shape[0]].copy_(A.T)
            bt[: B.shape[1]].copy_(B.T)
        return flat

    def unpack(self, flat: torch.Tensor) -> Factors:
        """The (padded) factors (A, B) of a flat row, as views."""
        out = {}
        for m in self.shapes:
            at, bt = self.views(flat, m)
            out[m] = (at.transpose(-1, -2), bt.transpose(-1, -2))
        return out


@dataclass
class BankCall:
    """One model call's routing through the bank: ``slots[i]`` is row i's bank row (0: none), and
    what its modules share (computed by the first module that needs it)."""

    slots: torch.Tensor
    any_rows: bool
    #: (merged bank row, (n, 1, 1) float mask of the rows that are not its adapter's) while merged
    correction: tuple[int, torch.Tensor] | None
    gathered: torch.Tensor | None = None  # (n, P): the rows' flat rows (prefill)
    b_block: torch.Tensor | None = None  # (n, P − b_start): the rows' Bᵀ blocks (decode)
    bags: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    per_token: bool = False  # slots[k] routes the call's k-th token (a fused step's packed sequence)


_CALL: ContextVar[BankCall | None] = ContextVar("peftlab_bank_call", default=None)


class AdapterBank:
    """Holds the resident LoRA adapters of one model, one flat row each (see the module docstring).

    Only the engine's decode thread changes it (loading a slot, re-laying, merging), between calls.
    """

    def __init__(self, model: nn.Module, capacity: int, device: torch.device, dtype: torch.dtype):
        self.model = model
        self.capacity = capacity
        self.device, self.dtype = device, dtype
        self.layout = BankLayout(rank=1)
        self.flat = torch.zeros(1, 0, device=device, dtype=dtype)  # row 0: no adapter
        self._modules = dict(model.named_modules())
        self._hooks: dict[str, Any] = {}
        self.merged: int | None = None
        self._saved_weights: dict[str, torch.Tensor] = {}

    # -- contents -------------------------------------------------------------------------------------
    def ensure_layout(self, factors: Factors) -> bool:
        """Re-lay the bank (and hook new modules) if ``factors`` do not fit; True if it did."""
        if self.layout.covers(factors):
            return False
        for m in factors:
            if m not in self._modules:
                raise ValueError(f"module {m!r} is not in the model")
            module = self._modules[m]
            if not is_adaptable_layer(module) or layer_info(module).kind not in ("linear", "conv1d"):
                raise ValueError(f"module {m!r} ({type(module).__name__}) is not a linear layer")
        new = self.layout.extended(factors)
        flat = torch.zeros(self.flat.shape[0], new.size, device=self.device, dtype=self.dtype)
        for m in self.layout.shapes:
            old_at, old_bt = self.layout.views(self.flat, m)
            at, bt = new.views(flat, m)
            at[..., : old_at.shape[-1]].copy_(old_at)
            bt[:, : old_bt.shape[-2]].copy_(old_bt)
        self.layout, self.flat = new, flat
        for m in new.shapes:
            if m not in self._hooks:
                self._hooks[m] = self._modules[m].register_forward_hook(self._hook(m), prepend=True)
        return True

    def repack(self, flat: torch.Tensor, layout: BankLayout) -> torch.Tensor:
        """A host flat row packed under ``layout`` re-packed under the bank's layout."""
        return self.layout.pack(layout.unpack(flat), flat.dtype, pin=flat.is_pinned())

    def put(self, slot: int, flat: torch.Tensor) -> None:
        """Load one adapter's flat row (already in the bank's layout) into ``slot`` (1-based)."""
        if not 1 <= slot <= self.capacity:
            raise ValueError(f"slot {slot} outside 1..{self.capacity}")
        if slot >= self.flat.shape[0]:
            rows = min(self.capacity + 1, max(slot + 1, 2 * self.flat.shape[0]))
            grown = torch.zeros(rows, self.layout.size, device=self.device, dtype=self.dtype)
            grown[: self.flat.shape[0]] = self.flat
            self.flat = grown
        self.flat[slot].copy_(flat, non_blocking=True)

    def clear(self, slot: int) -> None:
        """Zero a slot (its adapter left the device)."""
        if slot < self.flat.shape[0]:
            self.flat[slot].zero_()

    def nbytes(self) -> int:
        """Bytes of the bank on the compute device."""
        return self.flat.numel() * self.flat.element_size()

    def close(self) -> None:
        """Restore merged weights and remove every hook."""
        self.unmerge()
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()

    # -- calls ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def call(self, slots: list[int], per_token: bool = False) -> Iterator[None]:
        """Route the model calls inside the block: row i through bank row ``slots[i]`` (0: none);
        with ``per_token``, the k-th token of the call (rows × positions, flattened) through ``slots[k]``."""
        merged = self.merged
        if merged is not None:
            own = [s == merged for s in slots]
            slots = [0 if o else s for s, o in zip(slots, own)]
            if all(own):
                correction = None
            else:
                mask = torch.tensor([0.0 if o else 1.0 for o in own], device=self.device, dtype=self.dtype)
                correction = (merged, mask.view(-1, 1, 1))
        else:
            correction = None
        any_rows = any(slots)
        if not any_rows and correction is None:
            token = _CALL.set(None)
        else:
            token = _CALL.set(BankCall(torch.tensor(slots, device=self.device), any_rows, correction, per_token=per_token))
        try:
            yield
        finally:
            _CALL.reset(token)

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            c = _CALL.get()
            if c is None or name not in self.layout.shapes:
                return None
            y = output[0] if isinstance(output, tuple) else output
            delta = self._delta(c, name, args[0])
            delta = delta.view(y.shape).to(y.dtype)
            new = y.add_(delta) if not torch.is_grad_enabled() else y + delta
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return hook

    def _delta(self, c: BankCall, name: str, x: torch.Tensor) -> torch.Tensor:
        """Σ over the call's rows of their adapter's x Aᵀ Bᵀ at module ``name`` (minus the merged one's)."""
        layout, flat = self.layout, self.flat
        fin = x.shape[-1]
        n = x.numel() // fin if c.per_token else x.shape[0]
        xf = x.reshape(n, -1, fin).to(self.dtype)
        delta = None
        if c.any_rows and xf.shape[1] == 1:
            # Decode: h = A x per row as one embedding_bag over the bank seen as rows of R numbers
            # (row i sums its adapter's Aᵀ rows weighted by x_i: nothing is copied), then Bᵀ rows.
            if fin not in c.bags:
                stride = flat.shape[1] // layout.rank
                rows = c.slots.view(n, 1) * stride + torch.arange(fin, device=flat.device)
                c.bags[fin] = (rows.view(-1), torch.arange(0, n * fin, fin, device=flat.device))
            rows, offsets = c.bags[fin]
            first = layout.offsets[name][0] // layout.rank
            h = F.embedding_bag(rows + first, flat.view(-1, layout.rank), offsets, mode="sum",
                                per_sample_weights=xf.reshape(-1))
            fout = layout.shapes[name][1]
            table = layout.b_table(flat, name)
            if table is not None:  # Bᵀ rows the same way, weighted by h: again nothing copied
                key = -fout
                if key not in c.bags:
                    rows = c.slots.view(n, 1) * (flat.shape[1] // fout) + torch.arange(layout.rank, device=flat.device)
                    c.bags[key] = (rows.view(-1), torch.arange(0, n * layout.rank, layout.rank, device=flat.device))
                rows, offsets = c.bags[key]
                delta = F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=h.reshape(-1))
            else:
                if c.b_block is None:
                    c.b_block = flat[:, layout.b_start:].index_select(0, c.slots)
                delta = torch.bmm(h.unsqueeze(1), layout.b_views(c.b_block, name))
        elif c.any_rows:
            # Prefill: gather the rows' flat rows once per call, then two batched matmuls per module.
            if c.gathered is None:
                c.gathered = flat.index_select(0, c.slots)
            at, bt = layout.views(c.gathered, name)
            delta = torch.bmm(torch.bmm(xf, at), bt)
        if c.correction is not None:
            row, mask = c.correction
            at, bt = layout.views(flat[row], name)
            term = (xf @ at) @ bt * mask
            delta = -term if delta is None else delta - term
        assert delta is not None
        return delta

    # -- dLoRA merging ----------------------------------------------------------------------------
    def can_merge(self) -> bool:
        """Whether every bank module has a plain floating-point weight (not a quantized one)."""
        return all(
            self._modules[m].weight.dtype.is_floating_point and type(self._modules[m].weight) is nn.Parameter
            for m in self.layout.shapes
        )

    def merge(self, slot: int) -> None:
        """Fold bank row ``slot``'s ΔW = B A into the base weights (see the module docstring)."""
        if self.merged == slot:
            return
        self.unmerge()
        with torch.no_grad():
            for m in self.layout.shapes:
                at, bt = self.layout.views(self.flat[slot], m)
                if not bool(bt.any()):
                    continue
                module = self._modules[m]
                self._saved_weights[m] = module.weight.detach().clone()
                dw = (at.to(torch.float32) @ bt.to(torch.float32)).T  # ΔW = B A = (Aᵀ Bᵀ)ᵀ
                module.weight.add_(to_module_layout(module, dw).to(module.weight.dtype))
        self.merged = slot

    def unmerge(self) -> None:
        """Restore the base weights exactly (the saved originals)."""
        if self.merged is None:
            return
        with torch.no_grad():
            for m, w in self._saved_weights.items():
                self._modules[m].weight.copy_(w)
        self._saved_weights.clear()
        self.merged = None

