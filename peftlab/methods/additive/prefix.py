"""Prefix tuning (Li & Liang 2021; seed 000 eq. 8-9, 001 §7.2, 002 §3.1.2) and P-tuning v2.

Every self-attention layer l gets ``length`` = p trainable key and value rows, prepended to its own:

    head_l(x) = softmax( Q [P_k^l; K]ᵀ / √d + M ) [P_v^l; V],      P_k^l, P_v^l ∈ R^{p × kv_dim}

with M the model's mask, extended by p always-visible columns: the prefix is seen by every query,
padding stays masked. P = [P_k^1, P_v^1, ..., P_k^L, P_v^L] is one (p, L·2·kv_dim) tensor, trained
directly (P-tuning v2) or, with ``projection``, reparameterized as P = MLP(P') = W₂ tanh(W₁ P' + b₁) + b₂
(the paper's stabilizer); after training the MLP can be dropped by computing P once
(:meth:`PrefixDelta.drop_projection`), and a saved file always holds the computed P.

How it reaches the model (DESIGN.md principle 1, the base is never restructured): the delta's
``prepare`` rewrites the call's keyword arguments. It pre-fills a ``DynamicCache`` (decoder-only,
encoder-only) or the self-attention half of an ``EncoderDecoderCache`` (encoder-decoder) with P,
expanded over the batch, prepends p ones to the attention mask, and gives explicit ``position_ids``.

Positions: the prefix occupies positions 0..p−1 and the j-th *real* token of a row (padding not
counted) sits at p + j, computed from the attention mask, i.e. the input is literally [PREFIX; x]
(the paper's z = [PREFIX; x; y]; Hugging Face PEFT's forward does the same for unpadded rows, so
PEFT-trained prefixes give PEFT's outputs). Padded rows give the same output as the row run alone.
``offset_positions=False`` puts the first real token at 0 instead (not PEFT's function, so such an
adapter is saved as a peftlab-only file). T5's relative bias always sees the prefix before the tokens.

Generation: ``generate`` receives the pre-filled cache and the extended mask; since the mask is
longer than ``input_ids``, transformers does not slice the prompt by the cache length, and the
given ``position_ids`` are extended by one per step (transformers 5.24; 4.57's generate needs
``cache_position`` and per-step positions instead, see ``model_calls.start_generation_after_cache``).
The cache holds batch · max(num_beams, num_return_sequences) rows, as generate expands its inputs
(not a user cache). The cache argument's name is the model's own (``cache`` or ``past_key_values``).

Several prefix adapters active together are concatenated ([P_a; P_b]); a cache returned by a
prefixed call can be passed back (manual incremental decoding): the prefix is not added twice.
``PrefixDelta.prepare_routed`` gives each row of a batch its own adapter's prefix in one call.

T5's encoder drops any cache it is given, so the encoder prefix (``encoder=True``) is added by
temporary pre-hooks on its self-attention sublayers while ``prepare`` runs the encoder, and the
model gets ``encoder_outputs``. Gradient checkpointing: checkpointed transformers layers drop the
cache; for decoder-only and encoder models a read-only prefix cache is let through for that one call
(GPT-2, which drops it in its own loop, and encoder-decoders refuse with NotImplementedError).

No identity at init: any prefix takes softmax mass from the real keys (even P = 0 adds e^0 terms
with zero values), so ``identity_at_init`` is False; ``disable_adapters()`` gives the base exactly.
Not mergeable: P is not a function of the weights.

Files (Hugging Face PEFT's ``PREFIX_TUNING``): one tensor ``prompt_embeddings`` of shape
(p, num_layers · 2 · token_dim), token_dim = num_key_value_heads · head_dim with grouped-query
attention (else the hidden size); row layout (p, 2L, heads, head_dim), index 2l the keys and 2l+1
the values of layer l. Encoder-decoders (num_transformer_submodules = 2): PEFT duplicates the 2L
slots, regroups them 4 per decoder layer (self k, self v, cross k, cross v) and discards the cross
part, so decoder layer i reads slot (2i mod L); we mirror that so files give identical outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.core.config import ConfigError
from peftlab.core.delta import ModelDelta
from peftlab.core.gate import GateOption
from peftlab.core.model_calls import (
    accepts_argument,
    allow_cache_in_checkpoints,
    cache_argument,
    call_batch_size,
    call_device,
    encoder_self_attentions,
    generate_expand_size,
    injected_self_attention_cache,
    is_checkpointing,
    mask_key,
    model_dtype,
    new_cache,
    new_length,
    pass_cache,
    start_generation_after_cache,
    store_in_cache,
)
from peftlab.core.registry import PeftFormat, register_method
from peftlab.core.requirements import KV_CACHE_MODEL
from peftlab.methods.additive.virtual_tokens import VirtualTokensConfig, geometry_from_peft, peft_task_type

INITS = ("random", "zero", "tokens")
#: models whose layer loop itself passes no cache to checkpointed layers (so no prefix either)
_DROPS_CACHE_WHEN_CHECKPOINTING = ("gpt2", "decision_transformer")
_TAG = "_peftlab_prefix"  # attribute of a cache that a prefix delta created: what it already holds


@dataclass(kw_only=True)
class PrefixConfig(GateOption, VirtualTokensConfig):
    """Prefix tuning: ``length`` virtual key/value rows per self-attention layer.

    gate: scale each layer's P_k, P_v by gates from the layer's input (UniPELT; ``prefix_gate.py``).

    projection: reparameterize P = MLP(P') while training (P' ∈ R^{p×token_dim}, MLP hidden ``hidden``).
    init: ``tokens`` (the keys and values the base model computes for ``length`` random vocabulary
        tokens: the paper's "real words" init), ``random`` (N(0, 1), PEFT's default) or ``zero``.
        Unset, it is ``tokens`` without the projection and ``random`` with it. We deviate from PEFT's
        default on purpose: N(0, 1) keys and values swamp a pretrained model's attention (SmolLM2's
        held-out Alpaca loss goes from 2.44 to 8.70 at init and is still 5.46 after 12 steps, where
        ``tokens`` starts at 2.62 and reaches 1.91).
    encoder: encoder-decoders only, also prefix the encoder's self-attention (peftlab-only files).
    offset_positions: real tokens start at position ``length`` (True, PEFT's and the paper's) or 0.
    ``length`` and PEFT's geometry fields (filled from the model in place): see
    :class:`~peftlab.methods.additive.virtual_tokens.VirtualTokensConfig`. Targeting fields do not
    apply: the prefix goes to every self-attention layer.
    """

    placement = "adds key/value rows to every self-attention layer through the model's cache, not to chosen modules"
    projection: bool = False
    hidden: int = 512
    init: str | None = None
    encoder: bool = False
    offset_positions: bool = True

    def validate(self) -> None:
        super().validate()
        self._check(isinstance(self.hidden, int) and not isinstance(self.hidden, bool) and self.hidden > 0, "hidden",
                    "a positive int")
        for name in ("projection", "encoder", "offset_positions"):
            self._check(isinstance(getattr(self, name), bool), name, "true or false")
        self._check(self.init is None or self.init in INITS, "init", f"one of {', '.join(INITS)}")
        self._check(not (self.init == "tokens" and self.projection), "init", "random or zero with projection")

    @property
    def effective_init(self) -> str:
        """``init``, or its default: ``tokens`` for a direct prefix, ``random`` with the projection."""
        return self.init or ("random" if self.projection else "tokens")

    def to_peft(self, placed: Any = None) -> dict[str, Any]:
        """Hugging Face PEFT's ``PrefixTuningConfig`` fields (a config that PEFT cannot express, with
        ``encoder`` or without ``offset_positions``, is written as a peftlab-only file)."""
        fields = self.peft_fields(placed)  # raises before the geometry is known
        if self.encoder or not self.offset_positions or self.gate:
            return {"peft_type": "PEFTLAB"}
        return {"peft_type": "PREFIX_TUNING", **fields, "encoder_hidden_size": self.hidden,
                "prefix_projection": self.projection, "init_weights": "zero" if self.effective_init == "zero" else None}


def _from_peft(d: dict[str, Any]) -> PrefixConfig:
    """A ``PREFIX_TUNING`` config written by Hugging Face PEFT, as ours."""
    return PrefixConfig(
        projection=bool(d.get("prefix_projection", False)),
        hidden=int(d.get("encoder_hidden_size") or 512),
        init="zero" if d.get("init_weights") == "zero" else "random",
        **geometry_from_peft(d),
    )




# -- the math -----------------------------------------------------------------------------------
def split_prefix(flat: torch.Tensor, num_layers: int, heads: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's layout: (p, L·2·heads·d) → per layer l (P_k^l, P_v^l), each (heads, p, d).

    flat[t] viewed as (2L, heads, d): slot 2l holds the keys and 2l+1 the values of layer l."""
    p = flat.shape[0]
    kv = flat.view(p, 2 * num_layers, heads, -1).permute(1, 2, 0, 3)  # (2L, heads, p, d)
    return [(kv[2 * l], kv[2 * l + 1]) for l in range(num_layers)]


def decoder_slot(layer: int, num_layers: int, submodules: int) -> int:
    """The prefix slot layer ``layer`` reads: itself, or (2·layer mod L) for encoder-decoders (PEFT's
    4-per-layer regrouping of the duplicated slots, whose cross-attention half is discarded)."""
    return (2 * layer) % num_layers if submodules == 2 else layer


def prefix_positions(real_mask: torch.Tensor, offset: int, new: int) -> torch.Tensor:
    """Positions of the last ``new`` columns: offset + (number of real tokens before) (pads: offset)."""
    pos = real_mask.long().cumsum(-1) - 1
    return (pos.clamp(min=0) + offset).masked_fill(real_mask == 0, offset)[:, -new:]


# -- model geometry -------------------------------------------------------------------------------
def _geometry(model: nn.Module) -> dict[str, Any]:
    """PEFT's prefix geometry of a transformers model (its ``_prepare_prompt_learning_config`` rules)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise NotImplementedError(f"prefix tuning needs a transformers model; {type(model).__name__} has no config")
    cache_argument(model)  # TypeError naming the class when it takes no key/value cache
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    try:
        layers, heads = text.num_hidden_layers, text.num_attention_heads
        hidden = getattr(text, "hidden_size", None) or text.d_model
    except AttributeError as e:
        raise NotImplementedError(f"prefix tuning: cannot read the attention geometry of {type(model).__name__}") from e
    kv_heads = getattr(text, "num_key_value_heads", None)
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    if kv_heads is not None:
        token_dim, peft_heads = kv_heads * head_dim, kv_heads
    else:
        token_dim, peft_heads = hidden, heads
        if getattr(text, "d_kv", None) is not None and text.d_kv * heads != hidden:
            raise NotImplementedError("prefix tuning (PEFT's layout) needs num_heads · d_kv == d_model")
    enc_dec = bool(getattr(cfg, "is_encoder_decoder", False))
    if enc_dec and getattr(text, "num_decoder_layers", layers) != layers:
        raise NotImplementedError("prefix tuning (PEFT's layout) needs as many decoder as encoder layers")
    return {"num_layers": layers, "token_dim": token_dim, "num_attention_heads": peft_heads,
            "num_transformer_submodules": 2 if enc_dec else 1, "task_type": peft_task_type(model)}


# -- the delta ------------------------------------------------------------------------------------
class PrefixDelta(ModelDelta):
    """Model site: holds P (or P' and the MLP) and puts P into the model's key/value cache."""

    #: P is not a function of the weights: merge refuses (core/model.py reads this flag).
    mergeable = False

    def __init__(self, cfg: PrefixConfig, model: nn.Module | None = None):
        super().__init__()
        self.length, self.offset, self.token_dim = cfg.length, cfg.offset_positions, cfg.token_dim
        self.layers, self.heads = cfg.num_layers, cfg.num_attention_heads
        self.submodules = cfg.num_transformer_submodules
        width = cfg.num_layers * 2 * cfg.token_dim
        if cfg.projection:
            self.embedding = nn.Embedding(cfg.length, cfg.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(cfg.token_dim, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, width)
            )
            if cfg.effective_init == "zero":
                nn.init.zeros_(self.transform[2].weight)
                nn.init.zeros_(self.transform[2].bias)
        else:
            self.prompt_embeddings = nn.Parameter(torch.zeros(cfg.length, width))
            if cfg.effective_init == "random":
                nn.init.normal_(self.prompt_embeddings)
            elif cfg.effective_init == "tokens":
                with torch.no_grad():
                    self.prompt_embeddings.copy_(_token_prefix(model, cfg))
        if cfg.encoder:
            self.encoder_prompt_embeddings = nn.Parameter(torch.zeros(cfg.length, width))
            if cfg.effective_init != "zero":  # "tokens" initializes the decoder prefix only
                nn.init.normal_(self.encoder_prompt_embeddings)

    # -- parameters ---------------------------------------------------------------------------------
    def prefix(self) -> torch.Tensor:
        """P, shape (p, L·2·token_dim): the parameter itself, or MLP(P') with ``projection``."""
        if hasattr(self, "transform"):
            return self.transform(self.embedding.weight)
        return self.prompt_embeddings

    def layer_kv(self, flat: torch.Tensor, rows: int, dtype: torch.dtype, decoder: bool = True) -> list[tuple]:
        """Per layer (P_k, P_v) as (rows, heads, p, d) cache tensors (encoder-decoders: PEFT's slots)."""
        kv = split_prefix(flat.to(dtype), self.layers, self.heads)
        slots = [decoder_slot(i, self.layers, self.submodules) if decoder else i for i in range(self.layers)]
        return [tuple(t.unsqueeze(0).expand(rows, -1, -1, -1) for t in kv[s]) for s in slots]

    def drop_projection(self) -> None:
        """Compute P = MLP(P') once and keep only P (trainable as before); the MLP is discarded."""
        if not hasattr(self, "transform"):
            return
        trainable = self.embedding.weight.requires_grad
        with torch.no_grad():
            value = self.prefix().detach().clone()
        del self.embedding, self.transform
        self.prompt_embeddings = nn.Parameter(value, requires_grad=trainable)

    def changed_params(self, base: nn.Module) -> int:
        """Adapter entries that reach the outputs: all of them, except (encoder-decoders, no MLP) the
        slots PEFT's layout never gives to a decoder layer: L/2 of the L slots when L is even."""
        total = sum(p.numel() for p in self.parameters())
        if self.submodules == 2 and not hasattr(self, "transform"):
            unused = self.layers - len({decoder_slot(i, self.layers, 2) for i in range(self.layers)})
            total -= unused * self.prompt_embeddings.numel() // self.layers
        return total

    def file_state(self) -> dict[str, torch.Tensor]:
        """PEFT's key: ``prompt_embeddings`` = the computed P (and ours for the encoder prefix)."""
        out = {"prompt_embeddings": self.prefix()}
        if hasattr(self, "encoder_prompt_embeddings"):
            out["encoder_prompt_embeddings"] = self.encoder_prompt_embeddings
        return out

    def _load_checked(self, state: dict[str, torch.Tensor]) -> None:
        self.drop_projection()  # a file holds P itself: the MLP cannot be recovered from it
        with torch.no_grad():
            for key, value in state.items():
                getattr(self, key).copy_(value)

    # -- the call -----------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, kwargs: dict[str, Any], generating: bool = False) -> dict[str, Any]:
        """Add P to the call: cache pre-filled with P (expanded over the batch), mask [1…1; m],
        position_ids offset + (rank of the real token); see the module docstring."""
        kw = dict(kwargs)
        enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
        from transformers import DynamicCache, EncoderDecoderCache

        name = cache_argument(model)  # the model's own name for the cache (transformers 5.24: cache)
        cache = kw.get(name)
        tag = getattr(cache, _TAG, None)
        if cache is not None and tag is None and cache.get_seq_length() > 0:
            raise ValueError(f"prefix tuning: the {name} passed was not made by a prefixed call (it has no prefix)")
        encode = enc_dec and hasattr(self, "encoder_prompt_embeddings") and kw.get("encoder_outputs") is None
        if tag is not None and id(self) in tag["deltas"]:  # continuation of an earlier prefixed call
            if tag["reader"]:
                raise ValueError("prefix tuning: a cache made under gradient checkpointing holds only the prefix")
            if tag["deltas"][0] == id(self):
                self._fix_mask(model, kw, tag, cache, enc_dec)
            return self._encode(model, kw) if encode else kw
        if tag is not None and cache.get_seq_length() > tag["length"]:
            raise ValueError("prefix tuning: cannot add a prefix to a cache that already holds tokens")
        if generating and kw.get("use_cache") is False:
            raise ValueError("prefix tuning generates through the key/value cache; do not pass use_cache=False")
        reader = tag is None and not generating and is_checkpointing(model)
        if reader and (enc_dec or model.config.model_type in _DROPS_CACHE_WHEN_CHECKPOINTING):
            raise NotImplementedError(f"prefix tuning of {model.config.model_type} cannot run under gradient "
                                      "checkpointing: the cache (the prefix) does not reach its layers")
        if enc_dec and hasattr(self, "encoder_prompt_embeddings"):
            if not encode:
                raise ValueError("prefix tuning with encoder=True computes encoder_outputs itself; do not pass them")
            kw = self._encode(model, kw)
        ref = self.prefix()
        if tag is None:
            rows = call_batch_size(kw) * (generate_expand_size(model, kw) if generating else 1)
            self_cache = new_cache(self.layers if reader else 0)
            cache = EncoderDecoderCache(self_cache, DynamicCache()) if enc_dec else self_cache
            tag = {"deltas": [], "length": 0, "rows": rows, "mask": kw.get(mask_key(enc_dec)), "reader": reader,
                   "new": new_length(kw, enc_dec), "positions": kw.get("position_ids") is not None}
            setattr(cache, _TAG, tag)
            pass_cache(model, kw, cache)
            if reader:
                allow_cache_in_checkpoints(model, cache)
        self_cache = cache.self_attention_cache if enc_dec else cache
        dtype = model_dtype(model, ref)
        for layer, (k, v) in enumerate(self.layer_kv(ref, tag["rows"], dtype)):
            store_in_cache(self_cache, layer, k, v)
        tag["deltas"].append(id(self))
        tag["length"] += self.length
        kw[name] = cache
        self._fix_mask(model, kw, tag, cache, enc_dec)
        if generating:
            self._start_generation(model, kw, tag, cache, enc_dec)
        if generating and not enc_dec and kw.get("inputs_embeds") is not None:
            # generate() slices inputs_embeds by the cache length: put p placeholder rows in front
            emb = kw["inputs_embeds"]
            kw["inputs_embeds"] = torch.cat([emb.new_zeros(emb.shape[0], self.length, emb.shape[2]), emb], dim=1)
        return kw

    def _start_generation(self, model: nn.Module, kw: dict, tag: dict, cache: Any, enc_dec: bool) -> None:
        """generate() starts after the prefixes, real tokens keep the positions of :meth:`_fix_mask`
        (whichever way the installed transformers' generate needs it; one hook per cache)."""
        total, start = tag["length"], tag["length"] if self.offset else 0
        positions = None
        if not enc_dec and not tag["positions"] and accepts_argument(model, "position_ids"):
            def positions(mask: torch.Tensor, new: int) -> torch.Tensor:
                return prefix_positions(mask[:, total:], start, new)
        if tag.get("hook") is not None:  # an earlier prefix of the same call
            tag["hook"].remove()
        tag["hook"] = start_generation_after_cache(model, kw, cache, total, tag["new"], positions)

    def _fix_mask(self, model: nn.Module, kw: dict, tag: dict, cache: Any, enc_dec: bool) -> None:
        """mask ← [1 (all prefixes) ; m] with m the user's mask over the real tokens (past and new);
        position_ids = offset + rank of each new real token, unless the caller gave them."""
        key, total = mask_key(enc_dec), tag["length"]
        seen = (cache.self_attention_cache if enc_dec else cache).get_seq_length()
        fresh = seen == total  # this call put the prefixes in (else: a continuation)
        mask = tag["mask"] if fresh else kw.get(key)
        new = tag["new"] if fresh else new_length(kw, enc_dec)
        if mask is None and not enc_dec:
            mask = torch.ones(call_batch_size(kw), seen - total + new, dtype=torch.long, device=call_device(kw))
        if mask is None:
            return  # decoder of an encoder-decoder without padding: causal mask over [P; y] is right
        if mask.shape[-1] == seen + new and total:
            mask = mask[:, total:]  # the caller passed a mask that already covers the prefix
        kw[key] = torch.cat([mask.new_ones(mask.shape[0], total), mask], dim=-1)
        given = tag["positions"] if fresh else kw.get("position_ids") is not None
        if not enc_dec and not given and accepts_argument(model, "position_ids"):
            kw["position_ids"] = prefix_positions(mask, total if self.offset else 0, new)

    @classmethod
    def prepare_routed(cls, slots: list[list["PrefixDelta"]], slot: torch.Tensor, model: nn.Module,
                       kwargs: dict[str, Any], generating: bool = False) -> dict[str, Any]:
        """Mixed batch in one call: row i gets the prefix of adapter ``slots[slot[i]]`` (slot −1: none).

        The prefixes [P_a; P_b…] of each slot are right-aligned in p_max = max_k p_k cache columns and
        gathered per row; the p_max − p_k unused columns of a row are masked (a base row masks all of
        them), and row i's real tokens start at position p_{slot(i)}. Each row then computes exactly
        what its own adapter alone computes (relative positions to the prefix included)."""
        from transformers import DynamicCache, EncoderDecoderCache

        if any(hasattr(d, "encoder_prompt_embeddings") for s in slots for d in s):
            raise NotImplementedError("per-row prefixes with encoder=True are not supported")
        if kwargs.get(cache_argument(model)) is not None:
            raise NotImplementedError("per-row prefixes start from an empty cache")
        kw = dict(kwargs)
        enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
        ref = next(d for s in slots for d in s)
        dtype = model_dtype(model, ref.prefix())
        per_slot = [[d.layer_kv(d.prefix(), 1, dtype) for d in s] for s in slots]  # slot → delta → layer → (k, v)
        lengths = [sum(d.length for d in s) for s in slots]
        p_max = max(lengths)
        gather = (slot + 1).repeat_interleave(generate_expand_size(model, kw) if generating else 1)
        zero = torch.zeros(ref.heads, p_max, ref.token_dim // ref.heads, dtype=dtype, device=slot.device)
        self_cache = new_cache()
        for layer in range(ref.layers):
            keys, values = [zero], [zero]
            for kvs, p in zip(per_slot, lengths):
                pad = zero[:, : p_max - p]
                keys.append(torch.cat([pad, *(kv[layer][0][0] for kv in kvs)], dim=1))
                values.append(torch.cat([pad, *(kv[layer][1][0] for kv in kvs)], dim=1))
            self_cache.update(torch.stack(keys)[gather], torch.stack(values)[gather], layer)
        cache = EncoderDecoderCache(self_cache, DynamicCache()) if enc_dec else self_cache
        setattr(cache, _TAG, {"deltas": [None], "length": p_max, "reader": True})  # not to be continued
        lens = torch.tensor([0, *lengths], device=slot.device)[slot + 1]
        prefix_mask = torch.arange(p_max, device=slot.device)[None, :] >= (p_max - lens)[:, None]
        key = mask_key(enc_dec)
        mask = kw.get(key)
        if mask is None:
            mask = torch.ones(slot.shape[0], new_length(kw, enc_dec), dtype=torch.long, device=slot.device)
        kw[key] = torch.cat([prefix_mask.to(mask.dtype), mask], dim=-1)
        pass_cache(model, kw, cache)
        positions = None
        if not enc_dec and kw.get("position_ids") is None and accepts_argument(model, "position_ids"):
            offset = lens[:, None] if ref.offset else 0
            kw["position_ids"] = prefix_positions(mask, 0, mask.shape[-1]) + offset
            if not generating:
                # A base row numbers its positions as the base model alone does (0, 1, ..., pads
                # included), so it computes exactly the base model's output.
                plain = torch.arange(mask.shape[-1], device=slot.device)[None, :]
                kw["position_ids"] = torch.where((slot == -1)[:, None], plain, kw["position_ids"])
            row_offset = torch.tensor([0, *lengths], device=slot.device)[gather][:, None] if ref.offset else 0

            def positions(m: torch.Tensor, new: int) -> torch.Tensor:  # rows as generate expands them
                return prefix_positions(m[:, p_max:], 0, new) + row_offset
        if generating:
            start_generation_after_cache(model, kw, cache, p_max, new_length(kwargs, enc_dec), positions)
        if generating and not enc_dec and kw.get("inputs_embeds") is not None:
            emb = kw["inputs_embeds"]
            kw["inputs_embeds"] = torch.cat([emb.new_zeros(emb.shape[0], p_max, emb.shape[2]), emb], dim=1)
        return kw

    # -- encoder prefix (encoder-decoders) -----------------------------------------------------------
    def _encode(self, model: nn.Module, kw: dict) -> dict:
        """Run the encoder with P_enc in each self-attention (temporary hooks), pass encoder_outputs."""
        from transformers import DynamicCache

        encoder = model.get_encoder()
        blocks = encoder_self_attentions(encoder)
        mask = kw.get("attention_mask")
        rows = call_batch_size(kw)
        flat = self.encoder_prompt_embeddings
        cache = DynamicCache()
        for layer, (k, v) in enumerate(self.layer_kv(flat, rows, model_dtype(model, flat), decoder=False)):
            cache.update(k, v, layer)
        with injected_self_attention_cache(blocks, cache, self.length):
            names = ("input_ids", "inputs_embeds", "output_attentions", "output_hidden_states")
            enc_in = {k: kw[k] for k in names if kw.get(k) is not None}
            kw["encoder_outputs"] = encoder(**enc_in, attention_mask=mask, return_dict=True)
        return kw


def _token_prefix(model: nn.Module, cfg: PrefixConfig) -> torch.Tensor:
    """The keys/values the base computes for ``length`` random tokens, in PEFT's flat layout."""
    from transformers import DynamicCache, EncoderDecoderCache

    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, cfg.length), device=next(model.parameters()).device)
    enc_dec = cfg.num_transformer_submodules == 2
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache()) if enc_dec else DynamicCache()
    extra = {"decoder_input_ids": ids} if enc_dec else {}
    was_training = model.training
    with torch.no_grad():
        model.eval()  # no dropout in the activations we copy; the mode is restored below
        kw = {"input_ids": ids, **extra}
        pass_cache(model, kw, cache)
        model(**kw)
        model.train(was_training)
    layers = (cache.self_attention_cache if enc_dec else cache).layers
    heads = cfg.num_attention_heads
    flat = torch.zeros(cfg.length, 2 * cfg.num_layers, heads, cfg.token_dim // heads)
    for i, layer in enumerate(layers[: cfg.num_layers]):
        s = decoder_slot(i, cfg.num_layers, cfg.num_transformer_submodules)
        flat[:, 2 * s] = layer.keys[0].transpose(0, 1).float().cpu()
        flat[:, 2 * s + 1] = layer.values[0].transpose(0, 1).float().cpu()
    return flat.reshape(cfg.length, -1)


def _build(model: nn.Module, cfg: PrefixConfig) -> dict[str, ModelDelta]:
    """Fill the config's geometry from the model (refusing a mismatch) and create the delta."""
    cfg.fill_geometry(model, _geometry(model))
    if cfg.encoder and cfg.num_transformer_submodules != 2:
        raise ConfigError("prefix: encoder=True is for encoder-decoder models")
    if cfg.encoder:
        encoder_self_attentions(model.get_encoder())
    if cfg.gate:  # the gated variant is built on this module (imported here: it imports this one)
        from peftlab.methods.additive.prefix_gate import GatedPrefixDelta

        return {"": GatedPrefixDelta(cfg, model)}
    return {"": PrefixDelta(cfg, model)}


register_method(
    "prefix", PrefixConfig, _build, family="additive", sites=("model",), merges=False, per_row=True,
    example="prefix[length=20,projection=true,hidden=128]", default_lr=3e-2,
    peft=PeftFormat("PREFIX_TUNING", read=_from_peft, write=PrefixConfig.to_peft), needs=(KV_CACHE_MODEL,),
)
