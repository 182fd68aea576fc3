"""LLaMA-Adapter (Zhang et al. 2023, "LLaMA-Adapter: Efficient Fine-tuning of Language Models with
Zero-init Attention"; seed 002 §5.1.1).

In each of the top L self-attention layers, an adaption prompt A ∈ R^{m×h} (m = ``length``, h the
hidden size) gives extra keys and values through the layer's own frozen projections, without rotary
embedding: K_A = A W_kᵀ, V_A = A W_vᵀ. Every query attends to them in a softmax of its own, scaled
by a learned gate g that starts at 0, and the result goes through the output projection:

    o = Attn(x) + W_o ( g · softmax( RoPE(q) K_Aᵀ / √d ) V_A ),      q = W_q x,   g = 0 at init

per head (grouped-query attention: each key/value head serves its group of query heads). With g = 0
the adapted model is the base model exactly, and training starts from it (the paper's zero-init
attention). As in Hugging Face PEFT's ``ADAPTION_PROMPT``, the gate is used as it is (the paper's
official code uses tanh(g); both are 0 at init), the prompt tokens are seen by every query (no mask),
and the softmax is computed in float32.

How it reaches the model (DESIGN.md principle 1): an output-site delta on each adapted
``self_attn`` module, called through its dispatcher's hook with the module's input hidden states x,
its output and its keyword arguments (``reads_call``: the rotary ``position_embeddings`` (cos, sin)
the decoder layer hands the attention), adds the gated prompt attention to the output. The modules
are not replaced (PEFT swaps in wrapper modules). The projections are applied with their weights
directly (so other adapters' hooks on q/k/v/o_proj do not run on the prompt); W_o without its bias,
which the base output already holds (PEFT applies ``o_proj`` whole and so would add an o_proj bias
twice; Llama has none, so the outputs are the same).

Mixed batches: ``forward_routed`` gathers each row's K_A, V_A and gate (prompts of different
lengths padded with masked columns; a base row gets a zero gate) and computes the whole batch at once.

Needs a Llama-style decoder (:data:`LLAMA_ATTENTION`: ``self_attn`` modules with q/k/v/o_proj linear
layers and rotary ``position_embeddings``, without query/key norms: Llama, Mistral, Qwen2...).

Files (PEFT's ``ADAPTION_PROMPT``): ``base_model.model.<layer>.self_attn.adaption_prompt`` (1, m, h)
and ``.adaption_gate`` (1,); config fields ``adapter_len``, ``adapter_layers``, ``target_modules``
= ``"self_attn"``. Not mergeable (the prompt attention is not a function of the weights).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.config import AdapterConfig, ConfigError
from peftlab.core.delta import Delta
from peftlab.core.layers import weight_out_in
from peftlab.core.registry import PeftFormat, Requirement, register_method

_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def llama_style_attention(module: nn.Module) -> bool:
    """A Llama-style self-attention: q/k/v/o_proj linear layers, an int ``head_dim``, rotary
    ``position_embeddings`` given to its forward, and no query/key norms (which the prompt's query
    would have to reproduce)."""
    return (all(isinstance(getattr(module, p, None), nn.Linear) for p in _PROJECTIONS)
            and isinstance(getattr(module, "head_dim", None), int)
            and not any(hasattr(module, n) for n in ("q_norm", "k_norm"))
            and "position_embeddings" in inspect.signature(module.forward).parameters)


def llama_attentions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's ``self_attn`` modules that are Llama-style, in layer order."""
    return [(n, m) for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "self_attn" and llama_style_attention(m)]


LLAMA_ATTENTION = Requirement(
    what="a Llama-style decoder (self_attn modules with q_proj/k_proj/v_proj/o_proj linear layers that are "
         "given rotary position_embeddings, no query/key norms: Llama, Mistral, Qwen2...)",
    met=lambda model: getattr(model, "config", None) is not None
    and not getattr(model.config, "is_encoder_decoder", False) and bool(llama_attentions(model)),
    hint="For other architectures use prefix (key/value prefixes in every layer) or lora.",
)


@dataclass(kw_only=True)
class LlamaAdapterConfig(AdapterConfig):
    """LLaMA-Adapter: adaption prompts of ``length`` tokens in the top ``adapter_layers`` layers.

    length: m, the prompt length (PEFT's ``adapter_len``; the paper uses 10).
    adapter_layers: L, how many of the top self-attention layers get a prompt (PEFT's name; None: all).
        (The shared ``layers`` field selects block indices for every method, so the top count has
        PEFT's name here.)
    Targeting fields do not apply (``targets``, ``exclude``, ``layers``, ``module_types`` must be None).
    """

    length: int = 10
    adapter_layers: int | None = None

    def validate(self) -> None:
        for name in ("targets", "exclude", "layers", "module_types"):
            self._check(getattr(self, name) is None, name, "None: LLaMA-Adapter adapts the top adapter_layers "
                        "self-attention layers")
        self._check(isinstance(self.length, int) and not isinstance(self.length, bool) and self.length > 0,
                    "length", "a positive int")
        n = self.adapter_layers
        self._check(n is None or (isinstance(n, int) and not isinstance(n, bool) and n > 0), "adapter_layers",
                    "a positive int (the number of top layers) or None (all)")

    def to_peft(self, placed: Any = None) -> dict[str, Any]:
        """Hugging Face PEFT's ``AdaptionPromptConfig`` fields (it has no ``modules_to_save``: such an
        adapter is written as a peftlab-only file)."""
        if self.modules_to_save:
            return {"peft_type": "PEFTLAB"}
        layers = self.adapter_layers
        if layers is None:
            if placed is None:
                raise ConfigError("llama_adapter: the number of layers is known once the config is applied")
            layers = sum(isinstance(d, LlamaAdapterDelta) for d in placed.values())
        return {"peft_type": "ADAPTION_PROMPT", "task_type": None, "adapter_len": self.length,
                "adapter_layers": layers, "target_modules": "self_attn", "inference_mode": True,
                "base_model_name_or_path": None, "revision": None}


def _from_peft(d: dict[str, Any]) -> LlamaAdapterConfig:
    """An ``ADAPTION_PROMPT`` config as ours (Llama-style ``self_attn`` targets only)."""
    if (d.get("target_modules") or "self_attn") != "self_attn":
        raise ConfigError(f"llama_adapter reads ADAPTION_PROMPT files for self_attn modules, not "
                          f"target_modules={d.get('target_modules')!r} (PEFT's GPT-2 variant)")
    return LlamaAdapterConfig(length=int(d["adapter_len"]), adapter_layers=int(d["adapter_layers"]))


# -- the math -----------------------------------------------------------------------------------
def rotate(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on queries (B, H, T, d) with the model's (cos, sin) of shape (B or 1, T, d):
    q cos + rotate_half(q) sin, rotate_half([a; b]) = [−b; a] (Su et al. 2021, Llama's layout)."""
    a, b = q.chunk(2, dim=-1)
    return q * cos.unsqueeze(1) + torch.cat([-b, a], dim=-1) * sin.unsqueeze(1)


def gated_prompt_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gate: torch.Tensor,
                           mask: torch.Tensor | None = None) -> torch.Tensor:
    """LLaMA-Adapter's zero-init attention to the prompt, before W_o (Zhang et al. 2023, eq. 7-8):

        out_h = g · softmax( q_h K_Aᵀ / √d + mask ) V_A        for each query head h

    q (B, H, T, d) rotated queries; k, v (B or 1, H_kv, m, d) the prompt's keys and values, each
    serving H / H_kv query heads; gate (B or 1, 1, 1, 1); mask (B or 1, 1, 1, m) additive (padding
    of per-row prompts). The softmax is taken in float32. Returns (B, T, H · d)."""
    B, H, T, d = q.shape
    group = H // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = (gate.to(q.dtype) * probs) @ v
    return out.transpose(1, 2).reshape(B, T, H * d)


# -- the delta ------------------------------------------------------------------------------------
class LlamaAdapterDelta(Delta):
    """Output site on one ``self_attn``: y ← y + W_o(g · softmax(RoPE(q) K_Aᵀ/√d) V_A)."""

    site = "output"
    reads_call = True

    def __init__(self, attention: nn.Module, length: int):
        super().__init__()
        self.__dict__["attention"] = attention  # a reference, not a submodule: the base stays outside
        self.head_dim = attention.head_dim
        self.heads = attention.q_proj.out_features // self.head_dim
        self.adaption_prompt = nn.Parameter(torch.randn(1, length, attention.q_proj.in_features))  # PEFT: N(0, 1)
        self.adaption_gate = nn.Parameter(torch.zeros(1))  # zero-init: the base model at the start

    def prompt_kv(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K_A, V_A of shape (1, H_kv, m, d): the prompt through the frozen k_proj and v_proj."""
        a = self.attention
        prompt = self.adaption_prompt.to(dtype)
        k = F.linear(prompt, weight_out_in(a.k_proj).to(dtype), a.k_proj.bias)
        v = F.linear(prompt, weight_out_in(a.v_proj).to(dtype), a.v_proj.bias)
        return tuple(t.view(1, t.shape[1], -1, self.head_dim).transpose(1, 2) for t in (k, v))  # type: ignore[return-value]

    def queries(self, x: torch.Tensor, call: dict | None) -> torch.Tensor:
        """RoPE(W_q x), (B, H, T, d), with the rotary (cos, sin) the attention was given."""
        embeddings = (call or {}).get("position_embeddings")
        if embeddings is None:
            raise RuntimeError("llama_adapter: the attention was called without position_embeddings (cos, sin)")
        a = self.attention
        q = F.linear(x, weight_out_in(a.q_proj).to(x.dtype), a.q_proj.bias)
        q = q.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)
        return rotate(q, *(t.to(q.dtype) for t in embeddings))

    def output(self, attended: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + W_o · attended (W_o without its bias, which y already holds)."""
        w = weight_out_in(self.attention.o_proj)
        return y + F.linear(attended.to(w.dtype), w).to(y.dtype)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, call: dict | None = None) -> torch.Tensor:
        assert y is not None
        q = self.queries(x, call)
        k, v = self.prompt_kv(q.dtype)
        return self.output(gated_prompt_attention(q, k, v, self.adaption_gate.view(1, 1, 1, 1)), y)

    @classmethod
    def forward_routed(cls, deltas: Sequence["LlamaAdapterDelta | None"], slot: torch.Tensor, x: torch.Tensor,
                       y: torch.Tensor | None, call: dict | None = None) -> torch.Tensor:
        """Row i with the prompt and gate of ``deltas[slot[i]]`` (a base row: gate 0), one batched
        computation; prompts of different lengths are padded with masked columns."""
        assert y is not None
        ref = next(d for d in deltas if d is not None)
        q = ref.queries(x, call)
        kvs = [None if d is None else d.prompt_kv(q.dtype) for d in deltas]
        m = max(kv[0].shape[2] for kv in kvs if kv is not None)
        zero = q.new_zeros(1, kvs[[kv is not None for kv in kvs].index(True)][0].shape[1], m, q.shape[-1])
        keys, values, masks, gates = [zero[0]], [zero[0]], [q.new_zeros(m)], [q.new_zeros(1)]
        for d, kv in zip(deltas, kvs):
            if kv is None:
                keys.append(zero[0]), values.append(zero[0]), masks.append(q.new_zeros(m)), gates.append(q.new_zeros(1))
                continue
            pad = m - kv[0].shape[2]
            keys.append(F.pad(kv[0][0], (0, 0, 0, pad)))
            values.append(F.pad(kv[1][0], (0, 0, 0, pad)))
            masks.append(F.pad(q.new_zeros(m - pad), (0, pad), value=torch.finfo(q.dtype).min))
            gates.append(d.adaption_gate.to(q.dtype))
        index = slot + 1
        k, v = torch.stack(keys)[index], torch.stack(values)[index]
        mask, gate = torch.stack(masks)[index].view(-1, 1, 1, m), torch.stack(gates)[index].view(-1, 1, 1, 1)
        return ref.output(gated_prompt_attention(q, k, v, gate, mask), y)


def _build(model: nn.Module, cfg: LlamaAdapterConfig) -> dict[str, Delta]:
    """A delta on each of the top ``adapter_layers`` Llama-style self-attention modules."""
    found = llama_attentions(model)
    n = len(found) if cfg.adapter_layers is None else cfg.adapter_layers
    if n > len(found):
        raise ConfigError(f"llama_adapter: adapter_layers={n} but {type(model).__name__} has {len(found)} "
                          "self-attention layers")
    return {name: LlamaAdapterDelta(module, cfg.length) for name, module in found[len(found) - n:]}


register_method(
    "llama_adapter", LlamaAdapterConfig, _build, family="additive", sites=("output",), merges=False, per_row=True,
    example="llama_adapter[length=4,adapter_layers=1]", default_lr=1e-2,
    peft=PeftFormat("ADAPTION_PROMPT", read=_from_peft, write=LlamaAdapterConfig.to_peft), needs=(LLAMA_ATTENTION,),
)
