"""AdapterDrop (``adapterdrop=k`` on every bottleneck adapter): no adapter in the lowest k layers, and
the hidden states those layers produce are the base model's, bit for bit; the layers above change.
"""

from __future__ import annotations

import pytest
import torch

import peftlab
from conftest import randomize_adapter
from peftlab.core.targeting import layer_index
from peftlab.zoo import tiny_batch, tiny_model

METHODS = ["houlsby", "pfeiffer", "par_adapter", "par_adapter[site=attn]", "compacter", "compacter_pp"]


def with_drop(method: str, k: int) -> str:
    return f"{method[:-1]},adapterdrop={k}]" if method.endswith("]") else f"{method}[adapterdrop={k}]"


def hidden_states(model, batch) -> list[torch.Tensor]:
    """Every layer's output (each stack of an encoder-decoder that ran), embeddings first."""
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    if hasattr(out, "decoder_hidden_states"):
        return [*(out.encoder_hidden_states or ()), *out.decoder_hidden_states]
    return list(out.hidden_states)


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2", "vit", "t5"])
@pytest.mark.parametrize("method", METHODS)
def test_lowest_layers_carry_no_adapter_and_match_the_base(method, kind):
    base = tiny_model(kind)
    batch = tiny_batch(base, batch=2, seq=6)
    reference = hidden_states(base, batch)
    every = {n for _, n, _ in peftlab.apply(tiny_model(kind), method).placements["default"]}
    model = tiny_model(kind)
    pm = peftlab.apply(model, with_drop(method, 1))
    placed = {n for _, n, _ in pm.placements["default"]}
    assert placed == {n for n in every if layer_index(n) != 0}, "exactly the layer-0 modules are dropped"
    randomize_adapter(pm, std=0.3)
    got = hidden_states(model, batch)
    assert torch.equal(got[1], reference[1]), "layer 0's output is the base's"
    if kind == "t5":  # decoder block 0 too, given the same (adapted) encoder output to attend to
        with torch.no_grad():
            encoder_out = model.encoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        base_dec = hidden_states(base, {**batch, "encoder_outputs": encoder_out})
        assert torch.equal(got[4], base_dec[1]) and not torch.equal(got[4], reference[4])
    assert not torch.allclose(got[-1], reference[-1], atol=1e-4), "the layers above are adapted"


@pytest.mark.parametrize("method", METHODS)
def test_adapterdrop_validation_and_round_trip(method):
    cfg = peftlab.parse_method_string(with_drop(method, 1))
    assert cfg.adapterdrop == 1 and peftlab.parse_method_string(cfg.to_string()) == cfg
    with pytest.raises(peftlab.ConfigError, match="adapterdrop"):
        peftlab.parse_method_string(with_drop(method, -1))
    with pytest.raises(peftlab.TargetError, match="adapterdrop=2 removes every adapter"):
        peftlab.apply(tiny_model("llama"), with_drop(method, 2))


def test_counts_shrink_by_the_dropped_layers():
    full = peftlab.apply(tiny_model("bert"), "houlsby").report()["trainable_params"]
    dropped = peftlab.apply(tiny_model("bert"), "houlsby[adapterdrop=1]").report()["trainable_params"]
    assert dropped * 2 == full
    full = peftlab.apply(tiny_model("bert"), "compacter").report()["trainable_params"]
    dropped = peftlab.apply(tiny_model("bert"), "compacter[adapterdrop=1]").report()["trainable_params"]
    assert (full - 64) == 2 * (dropped - 64)  # the shared rule (4³) stays once
