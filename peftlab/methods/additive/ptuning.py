"""P-tuning (v1; Liu et al. 2021, "GPT Understands, Too"; seed 000 III-A2, 002 §3.1.2).

The virtual tokens are not trained directly: a prompt encoder computes them from trainable
embeddings E ∈ R^{n×d} of the n = l · s virtual token slots (s = 2 for encoder-decoders, PEFT's table):

    LSTM:  P = W₂ relu(W₁ BiLSTM(E) + b₁) + b₂      (BiLSTM with ``encoder_layers`` layers, hidden h)
    MLP:   P = W₃ relu(W₂ relu(W₁ E + b₁) + b₂) + b₃

and the first l rows of P are prepended to the input embeddings, exactly as prompt tuning's P
(``prompt.py``: the same delta, mask, labels, positions, generation and mixed batches). The paper
lets the template place the virtual tokens anywhere in the input; we prepend them, as Hugging Face
PEFT does (PEFT's ``P_TUNING`` is this encoder, ``PromptEncoder``).

Files (PEFT's ``P_TUNING``): PEFT saves the *computed* prompt P, (n, d), under ``prompt_embeddings``,
and reads it back into the embedding table of an encoder-less model that uses the table directly
(``inference_mode``). So do we: a saved adapter holds P, and loading one drops the encoder and keeps P
as a plain trainable table (P-tuning continues as prompt tuning; the encoder cannot be recovered
from P). Config fields ``encoder_reparameterization_type`` (MLP, LSTM), ``encoder_hidden_size``,
``encoder_num_layers``, ``encoder_dropout`` and the geometry of prompt tuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.core.delta import ModelDelta
from peftlab.core.registry import PeftFormat, register_method
from peftlab.core.requirements import INPUT_EMBEDDINGS_MODEL
from peftlab.methods.additive.prompt import PromptDelta, fill_geometry, table_rows
from peftlab.methods.additive.virtual_tokens import VirtualTokensConfig, geometry_from_peft

ENCODERS = ("mlp", "lstm")


@dataclass(kw_only=True)
class PTuningConfig(VirtualTokensConfig):
    """P-tuning: ``length`` virtual tokens computed by a prompt encoder.

    encoder: ``mlp`` (three linear layers, PEFT's default) or ``lstm`` (bidirectional LSTM + two linear layers).
    hidden: the encoder's hidden size h (None: the model's embedding width, as PEFT fills it in place).
    encoder_layers: LSTM layers (the MLP always has three linear layers, as in PEFT).
    dropout: dropout between LSTM layers.
    """

    encoder: str = "mlp"
    hidden: int | None = None
    encoder_layers: int = 2
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        self._check(self.encoder in ENCODERS, "encoder", f"one of {', '.join(ENCODERS)}")
        self._check(self.hidden is None or (isinstance(self.hidden, int) and not isinstance(self.hidden, bool)
                                            and self.hidden > 0), "hidden", "a positive int or None")
        layers = self.encoder_layers
        self._check(isinstance(layers, int) and not isinstance(layers, bool) and layers > 0, "encoder_layers",
                    "a positive int")
        self._check(self.encoder == "lstm" or layers == 2, "encoder_layers", "2 with encoder=mlp (its layer count is fixed)")
        self._check(isinstance(self.dropout, (int, float)) and not isinstance(self.dropout, bool)
                    and 0 <= self.dropout < 1, "dropout", "a float in [0, 1)")

    def to_peft(self, placed: Any = None) -> dict[str, Any]:
        """Hugging Face PEFT's ``PromptEncoderConfig`` fields."""
        return {"peft_type": "P_TUNING", **self.peft_fields(placed),
                "encoder_reparameterization_type": self.encoder.upper(), "encoder_hidden_size": self.hidden,
                "encoder_num_layers": self.encoder_layers, "encoder_dropout": float(self.dropout)}


def _from_peft(d: dict[str, Any]) -> PTuningConfig:
    """A ``P_TUNING`` config as ours (PEFT ignores ``encoder_num_layers`` with the MLP; so do we)."""
    encoder = str(d.get("encoder_reparameterization_type") or "MLP").lower()
    return PTuningConfig(encoder=encoder, hidden=d.get("encoder_hidden_size"),
                         encoder_layers=int(d.get("encoder_num_layers") or 2) if encoder == "lstm" else 2,
                         dropout=float(d.get("encoder_dropout") or 0.0), **geometry_from_peft(d))


# -- the math -------------------------------------------------------------------------------------
def encode_prompts(embeddings: torch.Tensor, mlp_head: nn.Module, lstm_head: nn.LSTM | None = None) -> torch.Tensor:
    """P-tuning's prompt encoder (Liu et al. 2021 §3.2): P = MLP(BiLSTM(E)) or P = MLP(E).

    ``embeddings`` E is (n, d); the LSTM, when given, runs over the n slots as one sequence."""
    x = embeddings.unsqueeze(0)
    if lstm_head is not None:
        x = lstm_head(x)[0]
    return mlp_head(x)[0]


class PromptEncoder(nn.Module):
    """E (``embedding``, N(0, 1) at init), the optional BiLSTM (``lstm_head``) and the MLP (``mlp_head``),
    PEFT's module names and shapes; ``forward()`` gives P (n, d)."""

    def __init__(self, slots: int, token_dim: int, hidden: int, kind: str, layers: int, dropout: float):
        super().__init__()
        self.embedding = nn.Embedding(slots, token_dim)
        if kind == "lstm":
            self.lstm_head = nn.LSTM(token_dim, hidden, num_layers=layers, dropout=dropout, bidirectional=True,
                                     batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, token_dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(token_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, token_dim))

    def forward(self) -> torch.Tensor:
        return encode_prompts(self.embedding.weight, self.mlp_head, getattr(self, "lstm_head", None))


def _build(model: nn.Module, cfg: PTuningConfig) -> dict[str, ModelDelta]:
    """Fill the config's geometry (and ``hidden``) from the model and create the delta."""
    fill_geometry(model, cfg)
    if cfg.hidden is None:
        cfg.hidden = cfg.token_dim
    encoder = PromptEncoder(table_rows(cfg), cfg.token_dim, cfg.hidden, cfg.encoder, cfg.encoder_layers, cfg.dropout)
    return {"": PromptDelta(cfg.length, encoder=encoder)}


register_method(
    "ptuning", PTuningConfig, _build, family="additive", sites=("model",), merges=False, per_row=True,
    example="ptuning[length=8,encoder=lstm,hidden=16]", default_lr=3e-3,
    peft=PeftFormat("P_TUNING", read=_from_peft, write=PTuningConfig.to_peft), needs=(INPUT_EMBEDDINGS_MODEL,),
)
