"""4-bit base layers (bitsandbytes ``Linear4bit``): what the hooks and the deltas need to know.

A delta never needs a per-backend subclass (DESIGN.md principle 1): a parallel delta only sees the
layer's input and output. What does depend on the layer's storage is collected here, so that the
rest of the core reads a 4-bit layer the way it reads an ``nn.Linear``:

- :func:`is_4bit` recognises a layer whose ``weight`` is a bitsandbytes ``Params4bit`` (by class
  name, so nothing here imports bitsandbytes until a 4-bit layer is actually read);
- :func:`dequantize` gives its weight W ≈ Q as a float ``(out, in)`` tensor (``core/layers.py``'s
  ``weight_out_in`` uses it: DoRA's norm, PiSSA's SVD, OFT's rotation, merging);
- :func:`requantize` stores a new float weight in the layer's own 4-bit format (merging:
  dequantize, add ΔW, requantize), returning the requantization error;
- :func:`roundtrip` is q_N(W) (quantize then dequantize, as a layer stores it): LoftQ's quantizer;
- :func:`logical_numel` counts a 4-bit parameter's entries (two per stored byte) for accounting;
- :func:`blocksize_for` is the block size a layer of a given input width is quantized with.

Everything runs on the tensor's own device (CPU or CUDA): bitsandbytes quantizes where the data is.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

#: The pip command named by every error about a missing bitsandbytes.
PIP_INSTALL = "pip install 'bitsandbytes>=0.45,<1'   (or: pip install 'peftlab[quant]')"


def bnb():
    """The ``bitsandbytes`` module, or an ``ImportError`` that gives the pip command."""
    try:
        import bitsandbytes
    except ImportError as e:  # pragma: no cover - the dev environment has it
        raise ImportError(f"4-bit quantization needs bitsandbytes, which is not installed: {PIP_INSTALL}") from e
    return bitsandbytes


#: NF4's block size (QLoRA's): 64 consecutive weights share one scale.
BLOCKSIZE = 64


def blocksize_for(in_features: int) -> int | None:
    """The block size for a layer with rows of ``in_features`` weights: 64, or 32 when 64 does not
    divide the rows but 32 does; None when neither does (the layer stays in float).

    Blocks never straddle two rows: bitsandbytes 0.50's CPU kernels read a block's scale per row
    (a (32, 32) weight in blocks of 64 is dequantized with the first scale for every row), while
    its CUDA kernels read it per flat block. With row-aligned blocks both agree, so a model
    quantized on one device computes the same on the other. Real models' widths are multiples of
    64; the rule only changes tiny ones."""
    for size in (BLOCKSIZE, 32):
        if in_features % size == 0:
            return size
    return None


def is_4bit_param(t: object) -> bool:
    """Whether ``t`` is a bitsandbytes 4-bit parameter (``Params4bit``)."""
    return type(t).__name__ == "Params4bit"


def is_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a 4-bit layer: its ``weight`` is a bitsandbytes ``Params4bit``."""
    return is_4bit_param(module.__dict__.get("_parameters", {}).get("weight"))


def float_dtype(t: torch.Tensor) -> torch.dtype:
    """The floating dtype a tensor stands for: a 4-bit parameter's original dtype (what it
    dequantizes to), else the tensor's own dtype."""
    if is_4bit_param(t):
        state = getattr(t, "quant_state", None)
        return state.dtype if state is not None else t.dtype
    return t.dtype


def logical_numel(p: torch.Tensor) -> int:
    """Entries a parameter stands for: a quantized 4-bit weight packs two entries per byte of its
    storage dtype (``quant_state.shape`` when known), anything else is ``numel()``."""
    if not is_4bit_param(p):
        return p.numel()
    state = getattr(p, "quant_state", None)
    if state is not None and getattr(p, "bnb_quantized", False):
        return int(torch.Size(state.shape).numel())
    return p.numel()


def _canonical(weight: torch.Tensor) -> tuple[torch.Tensor, object]:
    """(packed data, quant state) in bitsandbytes' canonical layout. On CPUs with AVX512-BF16,
    bitsandbytes repacks a layer's weight at its first inference call (and stores absmax in
    bfloat16); a copy is unpacked here so the layer itself is left as it is."""
    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # the only way back

    packed_absmax = state.absmax
    data, unpacked = _convert_weight_packed_for_cpu_inverse(weight.data.clone(), copy.deepcopy(state))
    # The repacked layer computes with the bfloat16 absmax: dequantize with exactly that.
    unpacked.absmax = packed_absmax.T.reshape(-1).float()
    unpacked.nested, unpacked.state2, unpacked.offset = False, None, None
    return data, unpacked


def dequantize(module: nn.Module) -> torch.Tensor:
    """The weight of a 4-bit layer as a new float ``(out, in)`` tensor, in its original dtype, on
    its device: exactly what the layer multiplies its input by."""
    data, state = _canonical(module.weight)
    w = bnb().functional.dequantize_4bit(data, state)
    return w.reshape(tuple(state.shape)).to(state.dtype)


def _params4bit(w: torch.Tensor, like: torch.Tensor | None = None, *, quant_type: str = "nf4",
                blocksize: int = 64, double_quant: bool = True, module: nn.Module | None = None) -> nn.Parameter:
    """``w`` (out, in) quantized into a ``Params4bit`` on ``w``'s device, with ``like``'s settings
    when given (quant type, block size, double quantization, storage dtype)."""
    kw = dict(quant_type=quant_type, blocksize=blocksize, compress_statistics=double_quant)
    if like is not None:
        kw = dict(quant_type=like.quant_type, blocksize=like.blocksize, compress_statistics=like.compress_statistics,
                  quant_storage=like.quant_storage)
    p = bnb().nn.Params4bit(w.detach().contiguous(), requires_grad=False, module=module, **kw)
    return p.to(w.device)  # bitsandbytes quantizes on the first move, on that device


def roundtrip(w: torch.Tensor, quant_type: str = "nf4", blocksize: int | None = None,
              double_quant: bool = True) -> torch.Tensor:
    """q(w): the (out, in) ``w`` quantized to 4 bits (NF4 with double quantization, in blocks of
    :func:`blocksize_for` its rows by default, as ``peftlab.quant.quantize`` stores a layer) and
    dequantized again, in ``w``'s dtype."""
    blocksize = blocksize or blocksize_for(w.shape[-1])
    if blocksize is None:
        raise ValueError(f"no 4-bit block size fits rows of {w.shape[-1]} values (a multiple of 32 is needed)")
    p = _params4bit(w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    return bnb().functional.dequantize_4bit(p.data, p.quant_state).reshape(w.shape).to(w.dtype)


def requantize(module: nn.Module, w: torch.Tensor) -> float:
    """Store the float ``(out, in)`` weight ``w`` in the 4-bit layer ``module``, in the layer's own
    format (a new ``Params4bit`` under the same name, so ``state_dict`` keys do not change).

    Returns the requantization error max |deq(q(w)) − w|: the layer now multiplies by deq(q(w))."""
    old = module.weight
    state = old.quant_state
    w = w.to(device=old.device, dtype=state.dtype).reshape(tuple(state.shape))
    new = _params4bit(w, like=old, module=module)
    module.weight = new
    module.quant_state = new.quant_state  # bitsandbytes reads it from the module too
    return (dequantize(module) - w).abs().max().item() if w.numel() else 0.0
