"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning";
seed 000 III-A2, 001 §7.1, 002 §3.1.2), and the virtual-token machinery P-tuning shares.

l trainable vectors P ∈ R^{l×d} are prepended to the input embeddings E(x) of every row:

    h = f([P; E(x)]),     mask [1…1; m],     labels [−100…−100; y]

How it reaches the model (DESIGN.md principle 1, the base is never restructured): the delta's
``prepare`` rewrites the call. ``input_ids`` become ``inputs_embeds`` = [P; E(x)] (E the model's own
``get_input_embeddings()``), the attention mask gets l visible columns in front, token-level
``labels`` and ``token_type_ids`` get l columns of −100 and 0. Encoder-decoders (T5) read P in the
encoder only (PEFT's SEQ_2_SEQ_LM prompt tuning); the decoder is untouched.

Positions (decoder-only models and encoders): P sits at 0..l−1 and the j-th real token of a row
(padding not counted) at l + j, as the input [P; x] numbers them; for unpadded and right-padded rows
this is exactly Hugging Face PEFT's numbering (it passes no positions, so the model counts 0..l+T−1),
and a left-padded row gives what the row gives alone (PEFT counts the pads there, as prefix.py notes).

Outputs line up with the caller's tokens: the l virtual positions are cut from ``logits`` (token
level), ``start_logits``/``end_logits``, ``last_hidden_state``, ``hidden_states`` and the query rows
of ``attentions`` (PEFT returns them; its logits[:, l:] are ours). The loss is the model's own, over
[P; x] with −100 on P. Encoder-decoder outputs are the decoder's and are not cut.

Generation (decoder-only): P is run through the model once (no gradient) and its keys and values
pre-fill the cache; ``generate`` then starts after them with the positions above (through
``model_calls.start_generation_after_cache``, for transformers 5.24 and 4.57 alike), which gives the
tokens a forward pass over [P; x] gives. Encoder-decoders get ``inputs_embeds`` = [P; E(x)].

Mixed batches (``prepare_routed``): each row's prompt P_k is gathered into a batch of p_max = max_k
p_k columns, padded with masked zero columns (a base row masks all of them), its real tokens at
p_k + j; a base row keeps the base model's own positions 0..T−1. Decoders and T5 get [pads; P_k; x]
(the last position, which a decoder's classifier pools, is the row's own; T5's relative positions
keep their distances); encoders get [P_k; x; pads] (BERT pools the first position), and their outputs
are gathered back per row. Each row computes what its adapter computes alone. For generation the
pre-fill holds [P_k; masked zeros] per row (pads after P_k, so causal attention keeps P_k's keys
exact and no query sees an empty row).

Files (Hugging Face PEFT's ``PROMPT_TUNING``): ``prompt_embeddings`` of shape (l · s, d), s =
``num_transformer_submodules`` (2 for SEQ_2_SEQ_LM, whose encoder reads the first l rows; the others
are PEFT's and never read), config fields ``num_virtual_tokens``, ``token_dim``, ``num_layers``,
``num_attention_heads``, ``prompt_tuning_init``...

Not mergeable; no identity at init (any prompt changes the outputs; ``disable_adapters()`` gives the
base exactly). A continuation cache from a prompted forward call is refused (``generate`` handles
the cache itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from peftlab.core.config import ConfigError
from peftlab.core.delta import ModelDelta
from peftlab.core.model_calls import (
    accepts_argument,
    cache_argument,
    call_batch_size,
    call_device,
    generate_expand_size,
    has_cache_argument,
    model_dtype,
    new_cache,
    pass_cache,
    start_generation_after_cache,
    store_in_cache,
)
from peftlab.core.registry import PeftFormat, register_method
from peftlab.core.requirements import INPUT_EMBEDDINGS_MODEL
from peftlab.methods.additive.prefix import prefix_positions
from peftlab.methods.additive.virtual_tokens import VirtualTokensConfig, geometry_from_peft, peft_task_type

INITS = ("random", "vocab", "text")
_PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}
#: Output fields whose dimension 1 runs over the input positions (cut to the caller's tokens).
_SEQUENCE_FIELDS = ("logits", "start_logits", "end_logits", "last_hidden_state", "hidden_states", "attentions")


def table_rows(cfg: VirtualTokensConfig) -> int:
    """Rows of PEFT's prompt table: ``length`` per transformer submodule (2 for encoder-decoders)."""
    return cfg.length * (cfg.num_transformer_submodules or 1)


def fill_geometry(model: nn.Module, cfg: VirtualTokensConfig) -> None:
    """Fill the config's PEFT geometry from the model (PEFT's ``_prepare_prompt_learning_config``
    rules; ``token_dim`` is the width of the model's input embeddings), refusing a mismatch."""
    cfg_m = model.config
    text = cfg_m.get_text_config() if hasattr(cfg_m, "get_text_config") else cfg_m
    enc_dec = bool(getattr(cfg_m, "is_encoder_decoder", False))
    found = {
        "num_layers": text.num_hidden_layers,
        "token_dim": model.get_input_embeddings().embedding_dim,
        "num_attention_heads": text.num_attention_heads,
        "num_transformer_submodules": 2 if enc_dec else 1,
        "task_type": peft_task_type(model),
    }
    cfg.fill_geometry(model, found)


@dataclass(kw_only=True)
class PromptConfig(VirtualTokensConfig):
    """Prompt tuning: ``length`` trainable input vectors.

    init: ``vocab`` (embeddings of random vocabulary tokens: PEFT's SAMPLE_VOCAB, the default here),
        ``random`` (N(0, 1): PEFT's default RANDOM) or ``text`` (the embeddings of a text's tokens,
        repeated or cut to the length: PEFT's TEXT). We deviate from PEFT's default on purpose, as
        prefix.py does: Lester et al. (§3.2, Fig. 3) find sampled vocabulary beats random init, and
        N(0, 1) rows are far larger than a trained model's token embeddings.
    init_token_ids: the token ids for ``init=text`` (e.g. ``tokenizer(text)["input_ids"]``; see
        :meth:`from_text`), or
    init_text + tokenizer_name_or_path: the text and a tokenizer ``AutoTokenizer.from_pretrained``
        loads (PEFT's fields), used when ``init_token_ids`` is None.
    """

    init: str = "vocab"
    init_text: str | None = None
    init_token_ids: list[int] | None = None
    tokenizer_name_or_path: str | None = None

    def validate(self) -> None:
        super().validate()
        self._check(self.init in INITS, "init", f"one of {', '.join(INITS)}")
        ids = self.init_token_ids
        if ids is not None:
            self.init_token_ids = ids = [ids] if isinstance(ids, int) and not isinstance(ids, bool) else ids
            self._check(isinstance(ids, (list, tuple)) and len(ids) > 0 and all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids), "init_token_ids",
                "a non-empty list of token ids (ints >= 0)")
            self.init_token_ids = list(ids)
        if self.init == "text":
            self._check(ids is not None or (self.init_text is not None and self.tokenizer_name_or_path is not None),
                        "init", "text only with init_token_ids, or with init_text and tokenizer_name_or_path")
        else:
            for name in ("init_text", "init_token_ids", "tokenizer_name_or_path"):
                self._check(getattr(self, name) is None, name, "None unless init=text")

    @classmethod
    def from_text(cls, text: str, tokenizer: Any, **fields: Any) -> "PromptConfig":
        """A text-initialised config: ``tokenizer(text)["input_ids"]`` (special tokens included, as
        PEFT tokenizes it) become ``init_token_ids``; the text is kept for the record."""
        return cls(init="text", init_text=text, init_token_ids=list(tokenizer(text)["input_ids"]), **fields)

    def to_peft(self, placed: Any = None) -> dict[str, Any]:
        """Hugging Face PEFT's ``PromptTuningConfig`` fields. PEFT has no "init from token ids" and
        needs a tokenizer for TEXT, so text given by ids is written as RANDOM: an init never
        matters to a saved adapter, which PEFT loads without initialising."""
        text = self.init == "text" and self.tokenizer_name_or_path is not None and self.init_text is not None
        init = "TEXT" if text else "RANDOM" if self.init == "text" else _PEFT_INIT[self.init]
        return {"peft_type": "PROMPT_TUNING", **self.peft_fields(placed), "prompt_tuning_init": init,
                "prompt_tuning_init_text": self.init_text if text else None,
                "tokenizer_name_or_path": self.tokenizer_name_or_path if text else None, "tokenizer_kwargs": None}


def _from_peft(d: dict[str, Any]) -> PromptConfig:
    """A ``PROMPT_TUNING`` config as ours. A saved adapter (``inference_mode``) written with TEXT is
    read as ``vocab``: its tensor comes from the file, and PEFT skips the init there too (no tokenizer)."""
    init = {v: k for k, v in _PEFT_INIT.items()}.get(str(d.get("prompt_tuning_init") or "RANDOM"), "random")
    text = {}
    if init == "text" and d.get("inference_mode"):
        init = "vocab"
    elif init == "text":
        text = {"init_text": d.get("prompt_tuning_init_text"), "tokenizer_name_or_path": d.get("tokenizer_name_or_path")}
    return PromptConfig(init=init, **text, **geometry_from_peft(d))


# -- the math -----------------------------------------------------------------------------------
def prepend_prompts(table: torch.Tensor, slot: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor,
                    lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[P_k; E(x)] per row and its mask [0…0 1…1; m]: ``table`` (S+1, p_max, d) holds each slot's
    prompt left-padded with zeros (row 0: the base, all zeros), ``slot`` (B,) indexes it (−1: base),
    ``lengths`` (S+1,) the real prompt length of each table row."""
    p_max = table.shape[1]
    lens = lengths[slot + 1]
    visible = torch.arange(p_max, device=emb.device)[None, :] >= (p_max - lens)[:, None]
    embeds = torch.cat([table.index_select(0, slot + 1).to(emb.dtype), emb], dim=1)
    return embeds, torch.cat([visible.to(mask.dtype), mask], dim=1)


def prompt_table(prompts: Sequence[torch.Tensor | None], device: torch.device, left: bool = True):
    """(S+1, p_max, d) stack of the slots' prompts padded to p_max with zeros (left or right), a zero
    row 0 for the base, and the (S+1,) real lengths."""
    ref = next(p for p in prompts if p is not None)
    p_max, d = max(0 if p is None else p.shape[0] for p in prompts), ref.shape[-1]
    rows, lengths = [ref.new_zeros(p_max, d)], [0]
    for p in prompts:
        p = ref.new_zeros(0, d) if p is None else p
        pad = p.new_zeros(p_max - p.shape[0], d)
        rows.append(torch.cat([pad, p] if left else [p, pad]))
        lengths.append(p.shape[0])
    return torch.stack(rows).to(device), torch.tensor(lengths, device=device)


def cut_outputs(output: Any, start: int | torch.Tensor, length: int, total: int) -> Any:
    """Keep ``length`` positions from column ``start`` (an int, or one per row: a (B,) tensor) of the
    sequence fields of a model output whose input had ``total`` positions (attentions: the query
    rows only, so each row still sums to 1; fields of another length are left as they are)."""
    def cut(t: Any, dim: int) -> Any:
        if isinstance(t, tuple):
            return tuple(cut(x, dim) for x in t)
        if not isinstance(t, torch.Tensor) or t.dim() <= dim or t.shape[dim] != total:
            return t
        if isinstance(start, int):
            return t.narrow(dim, start, length)
        index = start[:, None] + torch.arange(length, device=t.device)[None, :]  # (B, length)
        index = index.view(t.shape[0], *([1] * (dim - 1)), length, *([1] * (t.dim() - dim - 1)))
        return t.gather(dim, index.expand(*t.shape[:dim], length, *t.shape[dim + 1:]))

    for key in _SEQUENCE_FIELDS:
        value = output.get(key) if hasattr(output, "get") else None
        if value is None or (key == "logits" and value.dim() < 3):  # sequence classification logits
            continue
        output[key] = cut(value, 2 if key == "attentions" else 1)
    return output


# -- the delta ------------------------------------------------------------------------------------
class PromptDelta(ModelDelta):
    """Model site: holds P (or, for P-tuning, the encoder that computes it) and prepends it."""

    #: P is not a function of the weights: merge refuses (core/model.py reads this flag).
    mergeable = False

    def __init__(self, length: int, prompt: torch.Tensor | None = None, encoder: nn.Module | None = None):
        super().__init__()
        self.length = length  # rows the model reads; the table may hold more (PEFT's 2·l for T5)
        if encoder is not None:
            self.encoder = encoder
        else:
            self.prompt_embeddings = nn.Parameter(prompt.float())

    def prompts(self) -> torch.Tensor:
        """PEFT's prompt table (l · s, d): the parameter, or the encoder's output (P-tuning)."""
        return self.encoder() if hasattr(self, "encoder") else self.prompt_embeddings

    def drop_encoder(self) -> None:
        """Compute P once and keep only P (trainable as before); the encoder is discarded."""
        if not hasattr(self, "encoder"):
            return
        trainable = any(p.requires_grad for p in self.encoder.parameters())
        with torch.no_grad():
            value = self.encoder().detach().clone()
        del self.encoder
        self.prompt_embeddings = nn.Parameter(value, requires_grad=trainable)

    def changed_params(self, base: nn.Module) -> int:
        """Entries that reach the outputs: the encoder's, or the l rows of P the model reads."""
        if hasattr(self, "encoder"):
            return sum(p.numel() for p in self.parameters())
        return self.length * self.prompt_embeddings.shape[1]

    def file_state(self) -> dict[str, torch.Tensor]:
        """PEFT's key: ``prompt_embeddings`` = the (computed) prompt table."""
        return {"prompt_embeddings": self.prompts()}

    def _load_checked(self, state: dict[str, torch.Tensor]) -> None:
        self.drop_encoder()  # a file holds P itself: an encoder cannot be recovered from it
        with torch.no_grad():
            self.prompt_embeddings.copy_(state["prompt_embeddings"])

    def prepare(self, model: nn.Module, kwargs: dict[str, Any], generating: bool = False) -> dict[str, Any]:
        """[P; E(x)] for every row (see the module docstring)."""
        slot = torch.zeros(call_batch_size(kwargs), dtype=torch.long, device=call_device(kwargs))
        return insert_prompts(model, kwargs, [self.prompts()[: self.length]], slot, generating, routed=False)

    @classmethod
    def prepare_routed(cls, slots: Sequence[Sequence["PromptDelta"]], slot: torch.Tensor, model: nn.Module,
                       kwargs: dict[str, Any], generating: bool = False) -> dict[str, Any]:
        """Mixed batch in one call: row i gets [P_{slot(i)}; E(x_i)] (slot −1: no prompt). Several
        prompts of one slot are joined as stacking them would ([P_b; P_a] for a then b)."""
        prompts = [torch.cat([d.prompts()[: d.length] for d in reversed(s)]) if s else None for s in slots]
        return insert_prompts(model, kwargs, prompts, slot, generating, routed=True)


def insert_prompts(model: nn.Module, kwargs: dict[str, Any], prompts: Sequence[torch.Tensor | None],
                   slot: torch.Tensor, generating: bool, routed: bool) -> dict[str, Any]:
    """Rewrite a call so that row i reads [prompts[slot[i]]; E(x_i)] (see the module docstring)."""
    kw = dict(kwargs)
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    name = cache_argument(model) if has_cache_argument(model) else None
    if name is not None and kw.get(name) is not None and kw[name].get_seq_length() > 0:
        raise ValueError(f"prompt tuning: the prompt is part of the input, so a {name} from an earlier call cannot "
                         "be continued; pass the whole sequence, or use generate()")
    if enc_dec and kw.get("encoder_outputs") is not None:
        raise ValueError("prompt tuning adds the prompt to the encoder's input: pass input_ids or inputs_embeds, "
                         "not encoder_outputs")
    mask = kw.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise NotImplementedError("prompt tuning extends 2-D attention masks (batch, length) only")
    if generating and not enc_dec:
        return _start_generation(model, kw, prompts, slot, name, routed)
    ids = kw.pop("input_ids", None)
    emb = kw.get("inputs_embeds")
    if emb is None:
        emb = model.get_input_embeddings()(ids)
    B, T = emb.shape[:2]
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.long, device=emb.device)
    table, lengths = prompt_table(prompts, emb.device)
    p = table.shape[1]
    kw["inputs_embeds"], kw["attention_mask"] = prepend_prompts(table, slot, emb, mask, lengths)
    if enc_dec:
        return kw
    lens = lengths[slot + 1][:, None]
    if kw.get("token_type_ids") is not None:
        tt = kw["token_type_ids"]
        kw["token_type_ids"] = torch.cat([tt.new_zeros(tt.shape[0], p), tt], dim=1)
    labels = kw.get("labels")
    if labels is not None and labels.dim() >= 2 and labels.shape[1] == T:  # token-level labels
        kw["labels"] = torch.cat([labels.new_full((labels.shape[0], p), -100), labels], dim=1)
    if accepts_argument(model, "position_ids"):
        virtual = (torch.arange(p, device=emb.device)[None, :] - (p - lens)).clamp(min=0)
        given = kw.get("position_ids")
        real = given + lens if given is not None else prefix_positions(mask, 0, T) + lens
        if routed and given is None:
            # A base row numbers its positions as the base model alone does (0, 1, ..., pads included).
            real = torch.where((slot == -1)[:, None], torch.arange(T, device=emb.device)[None, :], real)
        kw["position_ids"] = torch.cat([virtual.expand(B, -1), real.expand(B, -1)], dim=1)
    start: int | torch.Tensor = p
    if routed and not _is_causal(model) and bool((lens < p).any()):
        # Encoders pool the first position (BERT's [CLS]): each row's own [P_k; x] starts at column
        # 0 and its padding columns go last (a permutation of the columns; attention is bidirectional
        # and positions explicit, so nothing else changes).
        shift = (p - lens)[:, 0]
        for key in ("inputs_embeds", "attention_mask", "position_ids", "token_type_ids", "labels"):
            if kw.get(key) is not None and kw[key].shape[1] == p + T:
                kw[key] = roll_rows(kw[key], shift)
        start = lens[:, 0]
    _cut_after_call(model, kw, start, T, p + T)
    return kw


def _is_causal(model: nn.Module) -> bool:
    """Whether the model's attention is causal (a decoder: its attention modules say ``is_causal``)."""
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


def roll_rows(t: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Row b of ``t`` rolled left by ``shift[b]`` columns along dimension 1 (one gather)."""
    S = t.shape[1]
    index = (torch.arange(S, device=t.device)[None, :] + shift[:, None]) % S
    return t.gather(1, index.view(*index.shape, *([1] * (t.dim() - 2))).expand_as(t))


def _cut_after_call(model: nn.Module, kw: dict[str, Any], start: int | torch.Tensor, length: int, total: int) -> None:
    """For the next call of ``model`` only: keep the caller's ``length`` positions of its output, from ``start``
    (a one-shot forward hook, run before those of earlier prompts and removed when the call ends or
    fails); a tuple output is made from the cut one."""
    as_tuple = kw.get("return_dict") is False or (
        kw.get("return_dict") is None and getattr(model.config, "return_dict", True) is False)
    if as_tuple:
        kw["return_dict"] = True

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        handle.remove()
        if output is None:  # the call failed
            return None
        output = cut_outputs(output, start, length, total)
        return output.to_tuple() if as_tuple else output

    handle = model.register_forward_hook(hook, prepend=True, always_call=True)


def _start_generation(model: nn.Module, kw: dict[str, Any], prompts: Sequence[torch.Tensor | None],
                      slot: torch.Tensor, name: str | None, routed: bool) -> dict[str, Any]:
    """Decoder-only ``generate``: pre-fill the cache with the keys and values of [P_k; zeros] per row
    (one no-grad forward pass of the prompts, through whatever adapter hooks are active: one row, or
    every row of a mixed batch, whose routing the hooks follow), mask the padding columns, and start
    generation after them with real tokens at p_k + j."""
    if name is None:
        raise NotImplementedError(f"prompt tuning generates through the key/value cache, which "
                                  f"{type(model).__name__} does not take")
    if kw.get("use_cache") is False:
        raise ValueError("prompt tuning generates through the key/value cache; do not pass use_cache=False")
    device = call_device(kw)
    table, lengths = prompt_table(prompts, device, left=False)
    p, B, expand = table.shape[1], slot.shape[0], generate_expand_size(model, kw)
    fill = table.index_select(0, slot + 1 if routed else slot[:1] + 1)
    prefill = new_cache()
    was_training = model.training
    with torch.no_grad():
        model.eval()
        call = {"inputs_embeds": fill.to(model_dtype(model, fill)), "use_cache": True}
        pass_cache(model, call, prefill)
        model(**call)
        model.train(was_training)
    cache, rows = new_cache(), B * expand // fill.shape[0]
    for i, layer in enumerate(prefill.layers):
        store_in_cache(cache, i, layer.keys.repeat_interleave(rows, 0), layer.values.repeat_interleave(rows, 0))
    lens = lengths[slot + 1][:, None]
    mask = kw.get("attention_mask")
    T = kw["input_ids"].shape[1] if kw.get("input_ids") is not None else kw["inputs_embeds"].shape[1]
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.long, device=device)
    visible = torch.arange(p, device=device)[None, :] < lens
    kw["attention_mask"] = torch.cat([visible.to(mask.dtype), mask], dim=1)
    pass_cache(model, kw, cache)
    positions = None
    if accepts_argument(model, "position_ids"):
        given = kw.get("position_ids")
        kw["position_ids"] = (given if given is not None else prefix_positions(mask, 0, T)) + lens
        if given is None:
            row_lens = lens.repeat_interleave(expand, 0)

            def positions(m: torch.Tensor, new: int) -> torch.Tensor:  # rows as generate expands them
                return prefix_positions(m[:, p:], 0, new) + row_lens
    start_generation_after_cache(model, kw, cache, p, T, positions)
    if kw.get("inputs_embeds") is not None:
        # generate() slices inputs_embeds by the cache length: put p placeholder rows in front
        emb = kw["inputs_embeds"]
        kw["inputs_embeds"] = torch.cat([emb.new_zeros(emb.shape[0], p, emb.shape[2]), emb], dim=1)
    return kw


# -- building -------------------------------------------------------------------------------------
def _initial_prompt(model: nn.Module, cfg: PromptConfig) -> torch.Tensor:
    """P at init, (l · s, d): N(0, 1), or the model's embeddings of random / the text's tokens."""
    table = model.get_input_embeddings()
    total = table_rows(cfg)
    if cfg.init == "random":
        return torch.randn(total, table.embedding_dim)
    if cfg.init == "vocab":
        ids = torch.randint(0, table.num_embeddings, (total,))
    else:
        ids = cfg.init_token_ids
        if ids is None:
            from transformers import AutoTokenizer

            ids = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path)(cfg.init_text)["input_ids"]
        if max(ids) >= table.num_embeddings:
            raise ConfigError(f"prompt: init_token_ids has id {max(ids)}, beyond the vocabulary ({table.num_embeddings})")
        ids = torch.tensor((list(ids) * math.ceil(total / len(ids)))[:total])  # PEFT: repeat, then cut
    with torch.no_grad():
        return table(ids.to(table.weight.device)).detach().float().cpu()


def _build(model: nn.Module, cfg: PromptConfig) -> dict[str, ModelDelta]:
    """Fill the config's geometry from the model and create the delta."""
    fill_geometry(model, cfg)
    return {"": PromptDelta(cfg.length, _initial_prompt(model, cfg))}


register_method(
    "prompt", PromptConfig, _build, family="additive", sites=("model",), merges=False, per_row=True,
    example="prompt[length=8,init=random]", default_lr=1e-2,
    peft=PeftFormat("PROMPT_TUNING", read=_from_peft, write=PromptConfig.to_peft), needs=(INPUT_EMBEDDINGS_MODEL,),
)
