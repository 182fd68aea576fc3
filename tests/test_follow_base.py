"""Adapters follow the base model (issue 8, item 3): ``model.to(dtype or device)`` on the user's own
object moves or casts its adapters and saved heads too at the next call, or that call raises a clear
error that says to call ``pm.to(...)``; never a raw dtype or device mismatch inside a layer.

This machine has no CUDA: the device path is checked with ``meta`` (the ``cuda`` test is skipped
without a GPU)."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core.follow import AdapterPlacementError, BaseRef, adapter_dtype
from peftlab.zoo import tiny_batch, tiny_model

from conftest import first_output, one_thread, randomize_adapter

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

#: (id, tiny model kind, task, method string, overrides): every site kind, and a saved head (HeadCopy).
CASES = [
    ("llama-lora", "llama", "base", "lora[r=4,alpha=8,targets=q_proj|v_proj]", {}),
    ("llama-ia3", "llama", "base", "ia3", {}),
    ("llama-prefix", "llama", "base", "prefix[length=3]", {}),
    ("bert-houlsby-head", "bert", "classification", "houlsby", {"modules_to_save": ["classifier"]}),
    ("bert-lora-head", "bert", "classification", "lora[r=4,targets=query|value]", {"modules_to_save": ["classifier"]}),
]
IDS = [c[0] for c in CASES]


def _adapted(kind: str, task: str, spec: str, overrides: dict):
    model = tiny_model(kind, task=task)
    pm = peftlab.apply(model, spec, **overrides)
    randomize_adapter(pm, std=0.2)
    batch = tiny_batch(model, batch=3, seq=6)
    # No padding: the tiny Llama alone gives NaN on a left-padded row in float64 (transformers' mask).
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    return model, pm, batch


def _run(fn, batch) -> torch.Tensor:
    with torch.no_grad():
        return first_output(fn(**batch))


def _adapter_dtypes(pm) -> set[torch.dtype]:
    return {p.dtype for p in pm.adapter_modules.parameters() if p.is_floating_point()}


def _devices(module) -> set[str]:
    return {p.device.type for p in module.parameters()}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_model_to_bfloat16_keeps_float32_adapters_and_equals_pm_to(case):
    _, kind, task, spec, overrides = case
    model, pm, batch = _adapted(kind, task, spec, overrides)
    reference = _run(pm, batch)
    model.to(torch.bfloat16)  # the user's own object, not the container
    out = _run(pm, batch)  # no "mat1 and mat2 must have the same dtype"
    assert _adapter_dtypes(pm) == {torch.float32}  # as if created on a bf16 base: float32, cast in forward
    pm.to(torch.bfloat16)  # everything in bf16, adapters included
    assert _adapter_dtypes(pm) == {torch.bfloat16}
    assert {p.dtype for p in pm.parameters() if p.is_floating_point()} == {torch.bfloat16}
    out_pm = _run(pm, batch)
    assert _adapter_dtypes(pm) == {torch.bfloat16}  # pm.to asked for bf16 adapters: the next call keeps them
    scale = reference.abs().max().item()
    assert (out.float() - out_pm.float()).abs().max().item() <= 0.05 * scale
    assert (out.float() - reference).abs().max().item() <= 0.05 * scale


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_model_to_float64_casts_adapters_and_heads(case):
    _, kind, task, spec, overrides = case
    model, pm, batch = _adapted(kind, task, spec, overrides)
    reference = _run(pm, batch)
    params_before = [id(p) for p in pm.adapter_modules.parameters()]
    model.to(torch.float64)
    out = _run(pm, batch)
    assert out.dtype == torch.float64
    assert _adapter_dtypes(pm) == {torch.float64}
    # nn.Module.to keeps the Parameter objects, so an optimizer that holds them still does.
    assert [id(p) for p in pm.adapter_modules.parameters()] == params_before
    assert (out - reference.double()).abs().max().item() <= 1e-5
    model.to(torch.float32)  # and back
    assert (_run(pm, batch) - reference).abs().max().item() <= 1e-5
    assert _adapter_dtypes(pm) == {torch.float32}


def _back_to_cpu(model, state: dict, buffers: dict) -> None:
    model.to_empty(device="cpu")
    model.load_state_dict(state)
    with torch.no_grad():  # non-persistent buffers (rotary frequencies, position ids) are not in the state dict
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_model_to_meta_is_a_clear_error_and_pm_to_meta_moves_everything(case):
    _, kind, task, spec, overrides = case
    model, pm, batch = _adapted(kind, task, spec, overrides)
    ids = {"input_ids": batch["input_ids"]}  # attention masks call .item() on meta inside transformers
    reference = _run(pm, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    model.to("meta")
    meta_ids = {"input_ids": ids["input_ids"].to("meta")}
    with pytest.raises(AdapterPlacementError, match=r"pm\.to\('meta'\)") as info:
        _run(pm, meta_ids)
    assert "mat1 and mat2" not in str(info.value)
    assert _devices(pm.adapter_modules) == {"cpu"}  # not moved: their values are kept
    with pm.disable_adapters():  # the base alone still runs on meta
        assert _run(pm, meta_ids).device.type == "meta"
    # Moving the model back (here: empty storage, then its weights) gives the adapted model again.
    _back_to_cpu(model, state, buffers)
    assert (_run(pm, ids) - reference).abs().max().item() <= 1e-6
    pm.to("meta")  # on purpose: adapters too
    assert _devices(pm) == {"meta"}
    assert _run(pm, meta_ids).device.type == "meta"
    _back_to_cpu(model, state, buffers)  # the adapters on meta hold no values: not followed either
    with pytest.raises(AdapterPlacementError, match="hold no values"):
        _run(pm, ids)


def test_direct_call_of_the_users_model_follows_too():
    """The hooks live on the user's model, so calling it directly also follows (or refuses meta)."""
    model, pm, batch = _adapted("bert", "classification", "lora[r=4,targets=query]", {"modules_to_save": ["classifier"]})
    reference = _run(pm, batch)
    model.double()
    out = _run(model, batch)
    assert _adapter_dtypes(pm) == {torch.float64}
    assert (out - reference.double()).abs().max().item() <= 1e-5
    model.to("meta")
    with pytest.raises(AdapterPlacementError, match=r"pm\.to\('meta'\)"):
        _run(model, {"input_ids": batch["input_ids"].to("meta")})


def test_follow_is_checked_once_per_change(monkeypatch):
    """A call reads one tensor's device and dtype per hooked module; the deltas are only looked at
    (``follow``) after the base changed, once."""
    import peftlab.core.dispatch as dispatch

    model, pm, batch = _adapted("llama", "base", "lora[r=4,targets=q_proj|v_proj]", {})
    _run(pm, batch)  # the first call accepts the state at creation
    calls = []
    real = dispatch.follow
    monkeypatch.setattr(dispatch, "follow", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    _run(pm, batch)
    assert calls == []
    model.to(torch.float64)
    _run(pm, batch)
    _run(pm, batch)
    assert len(calls) == len(pm._dispatchers)  # each module once, then never again


def test_mixed_batch_and_merge_after_the_model_was_cast():
    model, pm, batch = _adapted("llama", "base", "lora[r=4,targets=q_proj|v_proj]", {})
    peftlab.apply(pm, "lora[r=2,targets=q_proj]", adapter_name="b")
    randomize_adapter(pm, "b", seed=1)
    pm.set_adapter("default")
    names = ["default", "b", None]
    before = _run(lambda **kw: pm(**kw, adapter_names=names), batch)
    single = _run(pm, batch)
    model.to(torch.float64)
    after = _run(lambda **kw: pm(**kw, adapter_names=names), batch)
    assert (after - before.double()).abs().max().item() <= 1e-5
    model.to(torch.float32)
    model.to(torch.float64)  # merge before any call: merge itself brings the deltas along
    pm.merge()
    assert (_run(pm, batch) - single.double()).abs().max().item() <= 1e-5
    model.to(torch.float32)  # unmerge too
    pm.unmerge()
    assert (_run(pm, batch) - single).abs().max().item() <= 1e-5


def test_pm_to_moves_the_base_and_every_adapter():
    model, pm, batch = _adapted("bert", "classification", "houlsby", {"modules_to_save": ["classifier"]})
    pm.to(torch.float64)
    assert {p.dtype for p in pm.parameters() if p.is_floating_point()} == {torch.float64}
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float64}
    assert _run(pm, batch).dtype == torch.float64
    pm.to("meta")
    assert _devices(pm) == {"meta"} and _devices(model) == {"meta"}


def test_adapter_dtype_rule_and_base_ref():
    assert adapter_dtype(torch.bfloat16) == torch.float32
    assert adapter_dtype(torch.float16) == torch.float32
    assert adapter_dtype(torch.float64) == torch.float64
    layer = torch.nn.Linear(2, 2)
    ref = BaseRef(layer)
    assert ref.changed()  # nothing accepted yet: the first call checks
    ref.accept()
    assert not ref.changed()
    layer.half()
    assert ref.changed()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the device path is checked with meta above)")
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_model_to_cuda_moves_adapters(case):
    _, kind, task, spec, overrides = case
    model, pm, batch = _adapted(kind, task, spec, overrides)
    reference = _run(pm, batch)
    model.to("cuda")
    out = _run(pm, {k: v.cuda() for k, v in batch.items()})
    assert _devices(pm.adapter_modules) == {"cuda"}
    assert (out.cpu() - reference).abs().max().item() <= 1e-4
