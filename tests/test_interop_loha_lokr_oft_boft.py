"""LoHa, LoKr, OFT and BOFT files interoperate with Hugging Face PEFT 0.21, both ways, on tiny Llama
and BERT: PEFT's ``save_pretrained`` directory loads in ``peftlab.load`` and ours in
``peft.PeftModel.from_pretrained``, with the same outputs (max abs diff <= 1e-5), PEFT's tensor keys
and shapes exactly, the same config back and the same trainable count.

PEFT facts these variants rely on or work around:
- PEFT has none of the four on GPT-2's ``Conv1D`` (only Linear / Conv, OFT also Embedding): GPT-2
  files are peftlab's alone (PEFT refuses them loudly); they are not tested here.
- BOFT: without its CUDA extension PEFT trains with one butterfly factor whatever
  ``boft_n_butterfly_factor`` says (and saves one factor), so on this CPU machine only one factor
  can be compared; the butterfly products with more factors are checked against PEFT's own pieces
  in tests/test_oft_boft.py.
- OFT: PEFT's default is ``use_cayley_neumann=true`` (an approximation); peftlab's default is the
  exact Cayley transform, PEFT's ``use_cayley_neumann=false``. Both are read and written.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from conftest import main_output, randomize_adapter, tiny_net
from peftlab.methods.reparam.boft import BoftConfig
from peftlab.methods.reparam.loha import LohaConfig
from peftlab.methods.reparam.lokr import LokrConfig
from peftlab.methods.reparam.oft import OftConfig

import peft  # noqa: E402  (a dev dependency)

pytestmark = pytest.mark.filterwarnings("ignore")
TOL = 1e-5
MODELS = {"llama": lambda: tiny_net("llama"), "bert": lambda: tiny_net("bert", noisy_biases=True)}
TARGETS = {"llama": ["q_proj", "v_proj"], "bert": ["query", "value"]}
#: name -> (targets -> (PEFT config, our config)).
VARIANTS = {
    "loha": lambda t: (peft.LoHaConfig(r=2, alpha=6, target_modules=t), LohaConfig(r=2, alpha=6, targets=t)),  # factored
    "loha_r8": lambda t: (peft.LoHaConfig(r=8, alpha=8, target_modules=t, rank_dropout=0.1),
                          LohaConfig(r=8, targets=t, rank_dropout=0.1)),
    "lokr": lambda t: (peft.LoKrConfig(r=8, alpha=4, target_modules=t), LokrConfig(r=8, alpha=4, targets=t)),
    "lokr_both": lambda t: (peft.LoKrConfig(r=1, alpha=2, decompose_both=True, target_modules=t),
                            LokrConfig(r=1, alpha=2, decompose_both=True, targets=t)),
    "lokr_factor": lambda t: (peft.LoKrConfig(r=2, decompose_factor=2, init_weights="lycoris", target_modules="all-linear"),
                              LokrConfig(r=2, decompose_factor=2, init="lycoris", targets=["all-linear"])),
    "oft_exact": lambda t: (peft.OFTConfig(oft_block_size=8, use_cayley_neumann=False, target_modules=t),
                            OftConfig(block_size=8, targets=t)),
    "oft_peft_default": lambda t: (peft.OFTConfig(target_modules=t), OftConfig(neumann=True, targets=t)),
    "oft_r_share": lambda t: (peft.OFTConfig(r=4, oft_block_size=0, block_share=True, use_cayley_neumann=False,
                                             target_modules=t), OftConfig(r=4, block_size=0, block_share=True, targets=t)),
    "boft": lambda t: (peft.BOFTConfig(boft_block_size=4, target_modules=t), BoftConfig(block_size=4, targets=t)),
    "boft_num_dropout": lambda t: (peft.BOFTConfig(boft_block_num=4, boft_block_size=0, boft_dropout=0.1,
                                                   target_modules="all-linear"),
                                   BoftConfig(block_num=4, block_size=0, dropout=0.1, targets=["all-linear"])),
}
STD = 0.1


def _adapter_params(model):
    return [(n, p) for n, p in model.named_parameters() if ".default" in n]


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_file_loads_in_peftlab(kind, variant, tmp_path):
    peft_cfg, ours = VARIANTS[variant](TARGETS[kind])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(MODELS[kind](), peft_cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(_adapter_params(model)):
            p.add_(torch.randn(p.shape, generator=gen) * STD)
    model.eval()
    expected = main_output(model)
    model.save_pretrained(tmp_path)
    pm = peftlab.load(MODELS[kind](), tmp_path)
    got, want = pm.configs["default"].to_dict(), ours.to_dict()
    assert {k: v for k, v in got.items() if k != "targets"} == {k: v for k, v in want.items() if k != "targets"}
    assert (main_output(pm) - expected).abs().max().item() <= TOL
    assert (main_output(pm) - main_output(MODELS[kind]())).abs().max().item() > 1e-3, "the adapter changes outputs"
    assert sum(p.numel() for _, p in _adapter_params(model)) == pm.report()["trainable_params"]


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peftlab_file_loads_in_peft(kind, variant, tmp_path):
    peft_cfg, ours = VARIANTS[variant](TARGETS[kind])
    pm = peftlab.apply(MODELS[kind](), ours)
    randomize_adapter(pm, std=STD)
    pm.eval()
    expected = main_output(pm)
    pm.save(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == type(peft_cfg)().peft_type.value
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(MODELS[kind](), tmp_path)
    want = {n.replace(".default", ""): tuple(p.shape) for n, p in _adapter_params(theirs)}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == want  # PEFT's keys and shapes exactly
    assert (main_output(theirs) - expected).abs().max().item() <= TOL
    assert (expected - main_output(MODELS[kind]())).abs().max().item() > 1e-3, "the adapter changes outputs"

