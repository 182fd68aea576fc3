"""Criterion 5 of METHODS.md for every registered method: on a real pretrained model and a real
task, the loss falls and the task metric moves.

MiniLM (BERT encoder) on GLUE SST-2: dev accuracy rises well above the random head's.
SmolLM2-135M (Llama decoder) on Alpaca: held-out loss falls.
"""

from __future__ import annotations

import json

import pytest
import torch

import peftlab
from peftlab.core.registry import method_specs
from peftlab.core.targeting import TargetError
from peftlab.train.data import find_data_dir, head_module_names, load_task, make_loader
from peftlab.train.evaluation import evaluate_model

pytestmark = pytest.mark.real

METHODS = [s.name for s in method_specs()]
# Methods with few parameters need larger steps in this short budget (40 steps on SST-2, 12 on Alpaca).
LR = {"ia3": 2e-2, "bitfit": 1e-2, "prefix": 3e-2, "houlsby": 2e-3}


def _apply_or_skip(model, method, **kw):
    try:
        return peftlab.apply(model, method, **kw)
    except (TargetError, NotImplementedError) as e:
        pytest.skip(f"{method} does not apply here: {e}")


@pytest.fixture(scope="module")
def sst2():
    train = load_task("glue_sst2", "train", limit=1280, seed=1)
    dev = load_task("glue_sst2", "eval", limit=300, seed=0)
    return train, dev


@pytest.mark.parametrize("method", METHODS)
def test_trains_minilm_on_sst2(method, sst2):
    torch.manual_seed(0)
    train, dev = sst2
    model, tok = peftlab.zoo.load("minilm", task="classification", num_labels=2)
    dev_loader = make_loader(dev, tok, batch_size=100, max_length=64)
    before = evaluate_model(model, dev_loader)
    pm = _apply_or_skip(model, method, modules_to_save=head_module_names(model))
    opt = torch.optim.AdamW(peftlab.param_groups(pm, lr=LR.get(method, 3e-3)))
    losses = []
    pm.train()
    for batch in make_loader(train, tok, batch_size=32, max_length=64, shuffle=True, seed=0):
        loss = pm(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = evaluate_model(pm, dev_loader)
    q = len(losses) // 4
    assert sum(losses[-q:]) / q < sum(losses[:q]) / q, "training loss falls"
    assert after["accuracy"] > max(before["accuracy"], 0.5) + 0.1, (before, after)


def _alpaca_batches(tok, n: int, offset: int, batch_size: int = 4, max_length: int = 96):
    rows = json.loads((find_data_dir() / "alpaca" / "alpaca_data.json").read_text())[offset : offset + n]
    texts = [
        f"### Instruction:\n{r['instruction']}\n" + (f"### Input:\n{r['input']}\n" if r["input"] else "")
        + f"### Response:\n{r['output']}{tok.eos_token}"
        for r in rows
    ]
    for i in range(0, n, batch_size):
        enc = tok(texts[i : i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        yield {**enc, "labels": labels}


@pytest.mark.parametrize("method", METHODS)
def test_trains_smollm2_on_alpaca(method):
    if find_data_dir() is None:
        pytest.skip("no local data directory")
    torch.manual_seed(0)
    model, tok = peftlab.zoo.load("smollm2")
    held_out = list(_alpaca_batches(tok, 8, offset=5000))

    def held_out_loss(m):
        with torch.no_grad():
            return sum(m(**b).loss.item() for b in held_out) / len(held_out)

    before = held_out_loss(model)
    pm = _apply_or_skip(model, method)
    opt = torch.optim.AdamW(peftlab.param_groups(pm, lr=LR.get(method, 1e-3) / 2))
    pm.train()
    for batch in _alpaca_batches(tok, 48, offset=0):
        loss = pm(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.eval()
    after = held_out_loss(pm)
    assert after < before - 0.02, (before, after)
