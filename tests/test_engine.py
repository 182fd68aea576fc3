"""Registry-driven checks: every registered method, on every tiny architecture, is checked here
without anyone remembering to add it.

Which (method, architecture) pairs must work is what the method declares at registration
(``MethodSpec.needs``). For every declared pair: identity at init, a bit-identical unload, config
round trip, save -> load into a fresh base, merge / unmerge / merge_and_unload (or the declared
refusal), a mixed batch equal to each row's adapter run alone, gradients that reach only each row's
own adapter, and a few optimizer steps on a tiny teacher task that lower the loss. Every other pair
must raise :class:`~peftlab.NotApplicableError` naming the method, the model class and what is
missing. Nothing here turns an exception into a skip.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlab
from peftlab.core.delta import HeadCopy
from peftlab.core.registry import SITE_KINDS, method_specs
from peftlab.core.requirements import KV_CACHE_MODEL
from peftlab.zoo import TINY_KINDS, tiny_batch, tiny_model

from conftest import first_output, randomize_adapter, spy_on_routed

SPECS = {s.name: s for s in method_specs()}


@functools.cache
def _applies(method: str, kind: str) -> bool:
    return SPECS[method].applies_to(tiny_model(kind))


PAIRS = [(m, k) for m in SPECS for k in TINY_KINDS if _applies(m, k)]
REFUSED = [(m, k) for m in SPECS for k in TINY_KINDS if not _applies(m, k)]
ids = [f"{m}-{k}" for m, k in PAIRS]


def _setup(method: str, kind: str, seed: int = 0):
    model = tiny_model(kind, seed=seed)
    pm = peftlab.apply(model, method)
    return model, pm, tiny_batch(model, batch=3, seq=8)


def _out(pm, batch, **kw):
    with torch.no_grad():
        return first_output(pm(**batch, **kw))


# -- what a method declares ------------------------------------------------------------------------
def test_shared_requirements_match_the_architectures():
    """The requirement checks themselves, against facts about the tiny architectures."""
    have_cache = {k: KV_CACHE_MODEL.met(tiny_model(k)) for k in TINY_KINDS}
    assert have_cache == {"bert": True, "llama": True, "gpt2": True, "t5": True, "vit": False}
    assert not KV_CACHE_MODEL.met(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize("method", list(SPECS))
def test_method_applies_somewhere_and_declares_truthfully(method):
    """Each method applies to some tiny architecture; its declared sites and merge ability are
    exactly what its placed deltas do; its example string parses to its own config."""
    spec = SPECS[method]
    kinds = [k for m, k in PAIRS if m == method]
    assert kinds, f"{method} declares needs that none of {TINY_KINDS} meets"
    seen_sites, mergeable = set(), []
    for kind in kinds:
        pm = peftlab.apply(tiny_model(kind), method)
        deltas = [d for _, _, d in pm.placements["default"] if not isinstance(d, HeadCopy)]
        seen_sites |= {d.site for d in deltas}
        mergeable += [d.mergeable for d in deltas]
    assert seen_sites == set(spec.sites), (seen_sites, spec.sites)
    assert set(spec.sites) <= set(SITE_KINDS)
    assert all(mergeable) == spec.merges
    example = peftlab.parse_method_string(spec.example)
    assert type(example) is spec.config_cls and example.method == method
    assert spec.config_cls.method == method


@pytest.mark.parametrize("method,kind", REFUSED, ids=[f"{m}-{k}" for m, k in REFUSED])
def test_undeclared_pair_raises_the_documented_error(method, kind):
    model = tiny_model(kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(peftlab.NotApplicableError) as err:
        peftlab.apply(model, method)
    message = str(err.value)
    assert method in message and type(model).__name__ in message
    for requirement in SPECS[method].missing(model):
        assert requirement.what in message
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "a refused apply adds no hook"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", list(SPECS))
def test_config_round_trips(method):
    cfg = SPECS[method].config_cls()
    again = peftlab.parse_method_string(cfg.to_string())
    assert again.to_dict() == cfg.to_dict()
    assert type(cfg).from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    example = peftlab.parse_method_string(SPECS[method].example)
    assert peftlab.parse_method_string(example.to_string()).to_dict() == example.to_dict()


# -- every declared pair ---------------------------------------------------------------------------
@pytest.mark.parametrize("method,kind", PAIRS, ids=ids)
def test_identity_at_init_and_unload(method, kind):
    base_model = tiny_model(kind)
    batch = tiny_batch(base_model, batch=3, seq=8)
    with torch.no_grad():
        reference = first_output(base_model(**batch))
    before = {k: v.clone() for k, v in base_model.state_dict().items()}
    model, pm, _ = _setup(method, kind)
    assert pm.model is model and type(pm.model) is type(base_model)
    assert list(pm.model.state_dict()) == list(before), "base state_dict keys must not change"
    if SPECS[method].config_cls.identity_at_init:
        torch.testing.assert_close(_out(pm, batch), reference, atol=1e-5, rtol=0)
    randomize_adapter(pm)
    assert not torch.allclose(_out(pm, batch), reference, atol=1e-6), "a trained adapter must change outputs"
    with pm.disable_adapters():
        torch.testing.assert_close(_out(pm, batch), reference, atol=1e-6, rtol=0)
    unloaded = pm.unload()
    after = unloaded.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "unload must give a bit-identical state dict"
    torch.testing.assert_close(_out(unloaded, batch), reference, atol=0, rtol=0)


@pytest.mark.parametrize("method,kind", PAIRS, ids=ids)
def test_save_load_fresh_base(method, kind, tmp_path):
    model, pm, batch = _setup(method, kind)
    randomize_adapter(pm)
    expected = _out(pm, batch)
    pm.save(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    assert pm.report()["bytes_on_disk"] == sum(f.stat().st_size for f in tmp_path.iterdir())
    loaded = peftlab.load(tiny_model(kind), tmp_path)
    torch.testing.assert_close(_out(loaded, batch), expected, atol=1e-6, rtol=0)
    assert loaded.configs["default"].to_dict() == pm.configs["default"].to_dict()


@pytest.mark.parametrize("method,kind", PAIRS, ids=ids)
def test_merge_unmerge(method, kind):
    model, pm, batch = _setup(method, kind)
    randomize_adapter(pm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _out(pm, batch)
    if not SPECS[method].merges:
        with pytest.raises(RuntimeError, match="cannot be merged"):
            pm.merge()
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a refused merge changes nothing"
        return
    pm.merge()
    torch.testing.assert_close(_out(pm, batch), expected, atol=1e-5, rtol=1e-4)
    pm.unmerge()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=1e-6, rtol=0)
    torch.testing.assert_close(_out(pm, batch), expected, atol=1e-5, rtol=1e-4)
    merged = pm.merge_and_unload()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in merged.modules()), "no hooks left"
    torch.testing.assert_close(_out(merged, batch), expected, atol=1e-5, rtol=1e-4)


def _refuses_mixed_batches(method: str) -> bool:
    """A model-level method that does not batch per row declares so, and a mixed batch must then
    raise the documented error (hook-site methods without a batched path still serve mixed batches,
    one sub-batch per adapter)."""
    spec = SPECS[method]
    return "model" in spec.sites and not spec.per_row


def _two_adapters(method: str, kind: str):
    """Tiny model with adapters a and b of ``method``, both moved away from init (differently), both
    trainable."""
    model, pm, batch = _setup(method, kind)
    pm.add_adapter("b", method)
    pm.delete_adapter("default")
    pm.add_adapter("a", method)
    randomize_adapter(pm, "a", seed=1)
    randomize_adapter(pm, "b", seed=2)
    pm.set_adapter(["a", "b"])
    return model, pm, batch


def _real(out: torch.Tensor, batch: dict, row: int) -> torch.Tensor:
    """Row ``row`` of ``out`` at its real (unpadded) positions. A padded query attends to nothing,
    so its output is whatever the attention does with an all-masked row (it changes with extra
    masked key columns, e.g. a base row beside prefixed rows) and carries no meaning."""
    mask = batch.get("attention_mask")
    if mask is not None and out.dim() >= 2 and out.shape[1] == mask.shape[1]:
        return out[row][mask[row].bool()]
    return out[row]


@pytest.mark.parametrize("method,kind", PAIRS, ids=ids)
def test_mixed_batch_equals_per_adapter(method, kind, monkeypatch):
    """Row i of a batch routed ["a", "b", None] equals row i of the batch run with its adapter alone
    (None: the base), within 1e-5 at every real position; a method declared per_row takes the
    batched path."""
    model, pm, batch = _two_adapters(method, kind)
    spec = SPECS[method]
    if _refuses_mixed_batches(method):
        with pytest.raises(NotImplementedError, match=f"{method}.*cannot serve a mixed batch"):
            _out(pm, batch, adapter_names=["a", "b", None])
        return
    classes = {type(d) for _, _, d in pm.placements["a"] if d.site != "model"}
    spies = [spy_on_routed(monkeypatch, cls) for cls in classes]
    names = ["a", "b", None]
    mixed = _out(pm, batch, adapter_names=names)
    for i, name in enumerate(names):
        if name is None:
            with pm.disable_adapters():
                ref = _out(pm, batch)
        else:
            pm.set_adapter(name)
            ref = _out(pm, batch)
        assert (_real(mixed, batch, i) - _real(ref, batch, i)).abs().max().item() <= 1e-5, (i, name)
    if spec.per_row:
        calls = [c for spy in spies for c in spy]
        assert all(calls), "a per_row method fell back to one sub-batch per adapter"
        assert calls or "model" in spec.sites


@pytest.mark.parametrize("method,kind", PAIRS, ids=ids)
def test_gradients_reach_only_each_rows_adapter(method, kind):
    if _refuses_mixed_batches(method):
        return  # the refusal is checked by test_mixed_batch_equals_per_adapter
    model, pm, batch = _two_adapters(method, kind)
    pm.train()

    def grads_after(row: int) -> dict[str, bool]:
        for p in pm.parameters():
            p.grad = None
        out = first_output(pm(**batch, adapter_names=["a", "b", None]))
        out[row].float().pow(2).mean().backward()
        assert all(p.grad is None for p in model.parameters()), "the base gets no gradient"
        return {
            name: any(p.grad is not None and p.grad.abs().sum() > 0 for p, flag in pm.adapter_parameters(name) if flag)
            for name in ("a", "b")
        }

    assert grads_after(0) == {"a": True, "b": False}
    assert grads_after(1) == {"a": False, "b": True}
    assert grads_after(2) == {"a": False, "b": False}


@pytest.mark.parametrize("method,kind", PAIRS, ids=ids)
def test_learns_a_tiny_teacher(method, kind):
    """A fresh adapter learns the outputs of a randomized adapter of the same method (a target the
    method can reach) at the method's declared default learning rate: the loss falls by at least 30% in 25 steps."""
    torch.manual_seed(0)
    model, pm, batch = _setup(method, kind)
    randomize_adapter(pm, "default", std=0.3)
    with torch.no_grad():
        target = first_output(pm(**batch)).float()
    pm.add_adapter("student", method)
    pm.set_adapter("student")
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=SPECS[method].default_lr,
                            weight_decay=0.0)
    losses = []
    for _ in range(25):
        loss = F.mse_loss(first_output(pm(**batch)).float(), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.7 * losses[0], [round(x, 5) for x in losses]
