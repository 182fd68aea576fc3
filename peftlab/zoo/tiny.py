"""Tiny randomly initialised transformers models for unit tests: built from configs, no download."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .seeding import seeded

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

VOCAB = 128
HIDDEN = 32
LAYERS = 2
HEADS = 4
INTERMEDIATE = 64
MAX_POSITIONS = 64
IMAGE_SIZE = 16
PATCH_SIZE = 4
#: Special token ids of the tiny text models; :func:`peftlab.zoo.tiny_batch` samples ids above them.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def _bert_config() -> PretrainedConfig:
    """BERT encoder: 2 layers, hidden 32, 4 heads."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POSITIONS,
        type_vocab_size=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
        pad_token_id=PAD_ID,
    )


def _llama_config() -> PretrainedConfig:
    """Llama decoder with grouped-query attention (4 query heads share 2 key/value heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS // 2,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=MAX_POSITIONS,
        attention_dropout=0.0,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def _gpt2_config() -> PretrainedConfig:
    """GPT-2 decoder (its projections are transformers' ``Conv1D``, weight stored transposed)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=INTERMEDIATE,
        n_positions=MAX_POSITIONS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def _t5_config() -> PretrainedConfig:
    """T5 encoder-decoder: 2 encoder and 2 decoder layers."""
    from transformers import T5Config

    return T5Config(
        vocab_size=VOCAB,
        d_model=HIDDEN,
        d_kv=HIDDEN // HEADS,
        d_ff=INTERMEDIATE,
        num_layers=LAYERS,
        num_decoder_layers=LAYERS,
        num_heads=HEADS,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="relu",
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )


def _vit_config() -> PretrainedConfig:
    """ViT encoder on 16x16 RGB images cut into 4x4 patches (16 patches + CLS)."""
    from transformers import ViTConfig

    return ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


# kind -> (config factory, {task: model class name})
_KINDS: dict[str, tuple[Callable[[], PretrainedConfig], dict[str, str]]] = {
    "bert": (
        _bert_config,
        {
            "base": "BertModel",
            "classification": "BertForSequenceClassification",
            "regression": "BertForSequenceClassification",
        },
    ),
    "llama": (
        _llama_config,
        {
            "base": "LlamaForCausalLM",
            "causal-lm": "LlamaForCausalLM",
            "classification": "LlamaForSequenceClassification",
        },
    ),
    "gpt2": (_gpt2_config, {"base": "GPT2LMHeadModel", "causal-lm": "GPT2LMHeadModel"}),
    "t5": (_t5_config, {"base": "T5ForConditionalGeneration", "seq2seq": "T5ForConditionalGeneration"}),
    "vit": (_vit_config, {"base": "ViTModel", "classification": "ViTForImageClassification"}),
}

#: The kinds :func:`tiny_model` builds.
TINY_KINDS: tuple[str, ...] = tuple(_KINDS)


def tiny_tasks(kind: str) -> tuple[str, ...]:
    """The tasks :func:`tiny_model` accepts for ``kind``."""
    return tuple(_KINDS[kind][1])


def tiny_model(kind: str, task: str = "base", seed: int = 0) -> PreTrainedModel:
    """Build a tiny randomly initialised transformers model, in eval mode, in a few milliseconds.

    Args:
        kind: ``"bert"`` (BertModel), ``"llama"`` (LlamaForCausalLM with GQA), ``"gpt2"``
            (GPT2LMHeadModel, Conv1D projections), ``"t5"`` (T5ForConditionalGeneration) or
            ``"vit"`` (ViTModel). All have hidden size 32, 2 layers (2+2 for T5), 4 heads,
            feed-forward 64, text vocab 128; ViT takes 3x16x16 images in 4x4 patches.
        task: ``"base"`` (the classes above) or: ``"classification"`` (bert, llama, vit; 2
            labels), ``"regression"`` (bert; 1 output), ``"causal-lm"`` (llama, gpt2),
            ``"seq2seq"`` (t5).
        seed: the same seed gives bit-identical weights; the caller's RNG state is untouched.

    Dropout is 0 everywhere and attention is ``"eager"``, so train- and eval-mode outputs agree
    and results are reproducible.

    Raises:
        ValueError: unknown ``kind`` or a ``task`` that ``kind`` does not offer.
    """
    import transformers

    if kind not in _KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {', '.join(TINY_KINDS)}")
    make_config, classes = _KINDS[kind]
    if task not in classes:
        raise ValueError(f"tiny {kind!r} has no task {task!r}; expected one of {', '.join(classes)}")
    config = make_config()
    config._attn_implementation = "eager"
    extra: dict[str, Any] = {}
    if task == "classification":
        extra = {"num_labels": 2}
    elif task == "regression":
        extra = {"num_labels": 1, "problem_type": "regression"}
    for key, value in extra.items():
        setattr(config, key, value)
    model_class = getattr(transformers, classes[task])
    with seeded(seed):
        model = model_class(config)
    return model.eval()
