"""``quantize``: the base model's Linear layers in 4-bit NormalFloat with double quantization.

QLoRA (Dettmers et al. 2023; METHODS.md "Quantization with PEFT"): each weight matrix is stored in
blocks of 64 values (32 for rows of a width 64 does not divide: ``core/quantized.blocksize_for``), each value one of the 16 NF4 levels (quantiles of N(0, 1), scaled to [-1, 1]),
each block scaled by its absolute maximum; with double quantization the block scales are in turn
quantized to 8 bits in blocks of 256. Storage: 4 bits per weight plus about 8.5 bits per 64
weights for the scales, against 32 (float32) or 16 (bfloat16). The layer computes
y = x deq(Q)ᵀ + b in ``compute_dtype``.

This is the one place peftlab restructures a base model (DESIGN.md principle 1 otherwise holds):
each ``nn.Linear`` (or GPT-2 ``Conv1D``) is replaced by a bitsandbytes ``Linear4bit``. Quantization
is the user's explicit request to change the base, like ``model.to(torch.bfloat16)``: the weights
themselves change, so the float layer cannot be kept. Module names stay, the ``state_dict`` keys
are bitsandbytes' (``weight`` packed, plus ``weight.absmax``, ``weight.quant_map``...), and every
method then attaches to the 4-bit layers with its usual hooks (``core/quantized.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from peftlab.core.layers import layer_info
from peftlab.core.model import PeftModel, adapters_attached_to
from peftlab.core.quantized import blocksize_for, bnb, is_4bit
from peftlab.core.targeting import _is_head, entry_matches, is_linear

_log = logging.getLogger("peftlab.quant")

KINDS = ("nf4", "fp4")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class QuantizationError(ValueError):
    """A model cannot be quantized as asked (nothing to quantize, adapters already attached...)."""


@dataclass
class QuantReport:
    """What :func:`quantize` did: the layers replaced and the model's bytes before and after
    (every parameter and buffer, and the 4-bit layers' quantization statistics: block scales,
    their second-level scales and code books)."""

    kind: str
    double_quant: bool
    layers: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def ratio(self) -> float:
        """bytes_after / bytes_before."""
        return self.bytes_after / max(1, self.bytes_before)

    def __str__(self) -> str:
        mib = 1024 ** 2
        return (f"{self.kind}{' + double quantization' if self.double_quant else ''}: {len(self.layers)} Linear layers "
                f"in 4-bit, {len(self.skipped)} kept; {self.bytes_before / mib:.2f} MiB -> {self.bytes_after / mib:.2f} MiB "
                f"({100 * self.ratio:.1f}%)")


def model_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer of ``model``, and of the 4-bit layers'
    quantization statistics (what the model holds in memory; a tied tensor counts once)."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is None or t.device.type == "meta":
            return
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for t in (*model.parameters(), *model.buffers()):
        add(t)
    for m in model.modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None) if is_4bit(m) else None
        while state is not None:  # the block scales, then (double quantization) their own scales
            add(state.absmax)
            add(state.code)
            add(state.offset if isinstance(state.offset, torch.Tensor) else None)
            state = state.state2
    return total


def _dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise QuantizationError(f"compute_dtype={name!r} is invalid: expected one of {', '.join(_DTYPES)} or None")
    return _DTYPES[name]


def quantizable(model: nn.Module, skip: list[str] | None = None) -> tuple[dict[str, nn.Module], list[str]]:
    """({name: layer} that :func:`quantize` replaces, [names it keeps]): every ``nn.Linear`` /
    ``Conv1D`` except the output heads (as ``all-linear`` excludes them), the modules a transformers
    model keeps in float32 (``_keep_in_fp32_modules``, e.g. T5's ``wo``, which casts its input to
    its weight's dtype; transformers' own bitsandbytes loading skips them too) and the modules
    ``skip`` names (targeting rules: exact name, ``.``-suffix, ``re:<regex>``), and layers whose
    rows no block size divides (``core/quantized.blocksize_for``). Already 4-bit layers are
    neither."""
    skip = [*(skip or ()), *sorted(getattr(model, "_keep_in_fp32_modules", None) or ())]
    chosen, kept = {}, []
    for name, m in model.named_modules():
        if not name or not is_linear(m) or is_4bit(m):
            continue
        rows_fit = blocksize_for(layer_info(m).in_features) is not None
        if _is_head(name) or any(entry_matches(e, name) for e in skip) or not rows_fit:
            kept.append(name)
        else:
            chosen[name] = m
    return chosen, kept


def _float_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's float weight as (out, in) (a Conv1D's is stored transposed)."""
    w = layer.weight.detach()
    return w.T if layer_info(layer).kind == "conv1d" else w


def _to_4bit(layer: nn.Module, kind: str, double_quant: bool, compute_dtype: torch.dtype | None,
             source: torch.Tensor | None) -> nn.Module:
    """A ``Linear4bit`` holding q(``source`` or the layer's weight), the layer's bias (the same
    tensor) and train/eval mode, on the layer's device (quantized there)."""
    info = layer_info(layer)
    w = _float_weight(layer) if source is None else source.detach()
    if tuple(w.shape) != (info.out_features, info.in_features):
        raise QuantizationError(f"a source of shape {tuple(w.shape)} for a layer of ({info.out_features}, {info.in_features})")
    bias = getattr(layer, "bias", None)
    new = bnb().nn.Linear4bit(info.in_features, info.out_features, bias=bias is not None,
                              compute_dtype=compute_dtype or layer.weight.dtype, compress_statistics=double_quant,
                              quant_type=kind, device="meta")
    new.weight = bnb().nn.Params4bit(w.to(layer.weight.dtype).contiguous(), requires_grad=False,
                                     blocksize=blocksize_for(info.in_features), compress_statistics=double_quant,
                                     quant_type=kind, module=new).to(w.device)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
    # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight at its first inference call and
    # keeps its block scales in bfloat16 from then on: eval outputs would then differ from training
    # outputs, and dequantizing or merging would need bitsandbytes' private inverse. Keep the
    # canonical layout (the one CUDA uses). The flag only exists for, and only acts on, CPUs.
    new.support_avx512bf16_for_cpu = False
    new.train(layer.training)
    return new


def quantize(
    model: nn.Module,
    kind: str = "nf4",
    *,
    skip: list[str] | str | None = None,
    double_quant: bool = True,
    compute_dtype: str | torch.dtype | None = None,
    sources: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Put ``model``'s Linear layers in 4-bit (``"nf4"``: NormalFloat, QLoRA's; or ``"fp4"``) with
    double quantization, in place, through bitsandbytes, on the device where each layer is.

    Output heads (``lm_head``, ``classifier``, ``score``... as ``all-linear`` excludes them) and the
    modules named in ``skip`` stay in float. ``compute_dtype`` (default: each layer's own dtype) is
    what the 4-bit layers multiply in. ``sources`` {layer name: float (out, in) matrix}: store
    q(matrix) instead of q(W) for those layers (LoftQ chooses them; ``peftlab.quant.qlora``).

    Returns ``model`` (the same object), with ``model.quantization_report`` (a
    :class:`QuantReport`: the layers, the bytes before and after) and ``model.is_loaded_in_4bit =
    True`` (what transformers and PEFT read on a bitsandbytes model). Raises
    :class:`QuantizationError` for a model without Linear layers (or one carrying adapters), and
    ``ImportError`` with the pip command when bitsandbytes is missing.
    """
    if kind not in KINDS:
        raise QuantizationError(f"quantize: kind={kind!r} is invalid: expected one of {', '.join(KINDS)}")
    if isinstance(model, PeftModel) or adapters_attached_to(model):
        raise QuantizationError(
            "quantize: the model carries adapters; quantize the plain base first, then apply adapters "
            "(or pm.unload() first). Replacing a hooked layer would drop its adapters.")
    skip = [skip] if isinstance(skip, str) else list(skip or [])
    dtype = _dtype(compute_dtype)
    layers, kept = quantizable(model, skip)
    if not layers:
        kinds = sorted({type(m).__name__ for _, m in model.named_modules()})[:12]
        found = "all of them are output heads or skipped" if kept else f"its modules are {', '.join(kinds)}"
        raise QuantizationError(
            f"quantize: {type(model).__name__} has no Linear layer to put in 4-bit ({found}); quantize "
            "replaces nn.Linear (and GPT-2's Conv1D) layers except output heads")
    unknown = sorted(set(sources or {}) - set(layers))
    if unknown:
        raise QuantizationError(f"quantize: sources for {unknown}, which are not layers being quantized")
    bnb()  # a clear ImportError before anything is changed
    report = QuantReport(kind, double_quant, list(layers), kept, bytes_before=model_bytes(model))
    with torch.no_grad():
        for name, layer in layers.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _to_4bit(layer, kind, double_quant, dtype, (sources or {}).get(name)))
    report.bytes_after = model_bytes(model)
    model.quantization_report = report
    model.is_loaded_in_4bit = True
    _log.info("quantize %s: %s", type(model).__name__, report)
    return model
