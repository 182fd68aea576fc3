"""Registry-driven checks: every registered method, on every tiny model it applies to, gets
identity at init, save -> load into a fresh base, merge/unmerge, and a bit-identical unload.

A method added to the registry is checked here without anyone remembering to add it.
"""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core.registry import method_specs
from peftlab.core.targeting import TargetError
from peftlab.zoo import tiny_batch, tiny_model

from conftest import first_output, randomize_adapter

KINDS = ["bert", "llama", "gpt2", "t5", "vit"]
METHODS = [s.name for s in method_specs()]


def _setup(method: str, kind: str, seed: int = 0):
    model = tiny_model(kind, seed=seed)
    try:
        pm = peftlab.apply(model, method)
    except (TargetError, NotImplementedError) as e:
        pytest.skip(f"{method} does not apply to tiny {kind}: {e}")
    return model, pm, tiny_batch(model, batch=3, seq=8)


def _out(pm, batch):
    with torch.no_grad():
        return first_output(pm(**batch))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_identity_at_init_and_unload(method, kind):
    base_model = tiny_model(kind)
    batch = tiny_batch(base_model, batch=3, seq=8)
    with torch.no_grad():
        reference = first_output(base_model(**batch))
    before = {k: v.clone() for k, v in base_model.state_dict().items()}
    model, pm, _ = _setup(method, kind)
    spec = peftlab.get_method(method)
    assert pm.model is model and type(pm.model) is type(base_model)
    assert list(pm.model.state_dict()) == list(before), "base state_dict keys must not change"
    if spec.config_cls.identity_at_init:
        torch.testing.assert_close(_out(pm, batch), reference, atol=1e-5, rtol=0)
    randomize_adapter(pm)
    assert not torch.allclose(_out(pm, batch), reference, atol=1e-6), "a trained adapter must change outputs"
    with pm.disable_adapters():
        torch.testing.assert_close(_out(pm, batch), reference, atol=1e-6, rtol=0)
    unloaded = pm.unload()
    after = unloaded.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "unload must give a bit-identical state dict"
    torch.testing.assert_close(_out(unloaded, batch), reference, atol=0, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_save_load_fresh_base(method, kind, tmp_path):
    model, pm, batch = _setup(method, kind)
    randomize_adapter(pm)
    expected = _out(pm, batch)
    pm.save(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    assert pm.report()["bytes_on_disk"] == sum(f.stat().st_size for f in tmp_path.iterdir())
    fresh = tiny_model(kind)
    loaded = peftlab.load(fresh, tmp_path)
    torch.testing.assert_close(_out(loaded, batch), expected, atol=1e-6, rtol=0)
    assert loaded.configs["default"].to_dict() == pm.configs["default"].to_dict()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge(method, kind):
    model, pm, batch = _setup(method, kind)
    randomize_adapter(pm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _out(pm, batch)
    mergeable = all(d.mergeable for _, _, d in pm.placements["default"])
    if not mergeable:
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
    assert not merged._forward_hooks and not merged._forward_pre_hooks
    assert all(not m._forward_hooks for m in merged.modules()), "merge_and_unload leaves no hooks"
    torch.testing.assert_close(_out(merged, batch), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_method_applies_somewhere(method):
    """Each registered method works on at least one tiny architecture with its defaults."""
    ok = []
    for kind in KINDS:
        try:
            peftlab.apply(tiny_model(kind), method)
            ok.append(kind)
        except (TargetError, NotImplementedError):
            pass
    assert ok, f"{method} applies to none of {KINDS} with its default config"


@pytest.mark.parametrize("method", METHODS)
def test_config_round_trips(method):
    cfg = peftlab.get_method(method).config_cls()
    again = peftlab.parse_method_string(cfg.to_string())
    assert again.to_dict() == cfg.to_dict()
    assert type(cfg).from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
