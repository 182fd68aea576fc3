"""Finding the task head of a model: the freshly initialised layers a PEFT method must train."""

from __future__ import annotations

from torch import nn

#: Head names used by common model classes (BERT: classifier, Llama/GPT-2: score,
#: BART/T5: classification_head, DistilBERT: pre_classifier + classifier).
KNOWN_HEAD_NAMES = ("pre_classifier", "classifier", "score", "classification_head")


def head_module_names(model: nn.Module) -> list[str]:
    """Names of the model's top-level task-head modules, in definition order.

    For a Hugging Face model (it has ``base_model_prefix``, e.g. "bert") these are the top-level
    children that hold parameters and are not the pretrained backbone: ``classifier`` for
    BertForSequenceClassification, ``score`` for LlamaForSequenceClassification. The pooler lives
    inside the backbone and is pretrained, so it is not a head. For other modules the children
    named in :data:`KNOWN_HEAD_NAMES` are returned.
    """
    children = dict(model.named_children())
    prefix = getattr(model, "base_model_prefix", None)
    if isinstance(prefix, str) and prefix in children:
        return [name for name, child in children.items()
                if name != prefix and any(True for _ in child.parameters())]
    return [name for name in children if name in KNOWN_HEAD_NAMES
            and any(True for _ in children[name].parameters())]
