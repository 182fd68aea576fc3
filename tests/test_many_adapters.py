"""Several adapters on one model: summed, switched, deleted, and mixed per row in one batch."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.core.dispatch import _routed_sequential

from conftest import assert_mixed_batch_equals_per_adapter, first_output, randomize_adapter, spy_on_routed


@pytest.fixture
def three_adapters(tiny):
    model, batch = tiny("llama")
    pm = peftlab.apply(model, "lora[r=4,targets=q_proj|v_proj]", adapter_name="a")
    pm.add_adapter("b", "lora[r=2,alpha=4,targets=all-linear]")
    pm.add_adapter("c", "dora[r=3,targets=v_proj|o_proj]")
    for i, name in enumerate(pm.adapters):
        randomize_adapter(pm, name, seed=i)
    return pm, batch


def _out(pm, batch, **kw):
    return first_output(pm(**batch, **kw))


def test_switch_and_sum(three_adapters):
    pm, batch = three_adapters
    with torch.no_grad():
        with pm.disable_adapters():
            base = _out(pm, batch)
        outs = {}
        for name in pm.adapters:
            pm.set_adapter(name)
            outs[name] = _out(pm, batch)
        assert all(not torch.allclose(outs[n], base) for n in outs)
        assert pm.active_adapters == ["c"]
        # LoRA a and b are parallel deltas on linear maps: at the first layer their effects add.
        pm.set_adapter(["a", "b"])
        both = _out(pm, batch)
    assert not torch.allclose(both, outs["a"]) and not torch.allclose(both, outs["b"])
    layer = pm.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 32)
    da = next(d for _, n, d in pm.placements["a"] if n.endswith("layers.0.self_attn.q_proj"))
    db = next(d for _, n, d in pm.placements["b"] if n.endswith("layers.0.self_attn.q_proj"))
    torch.testing.assert_close(layer(x), x @ layer.weight.T + da(x) + db(x), atol=1e-5, rtol=1e-5)


def test_only_active_adapter_is_trainable(three_adapters):
    pm, _ = three_adapters
    pm.set_adapter("b")
    trainable = {n.split(".")[1] for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable == {"b"}


def test_mixed_batch_equals_per_adapter_outputs(three_adapters):
    pm, batch = three_adapters
    assert_mixed_batch_equals_per_adapter(pm, ["a", "c", None], batch)


def test_mixed_batch_gradients_reach_each_rows_adapter(three_adapters):
    pm, batch = three_adapters
    pm.set_adapter(["a", "b", "c"])  # make all trainable
    out = _out(pm, batch, adapter_names=["a", "a", "b"])
    out.pow(2).mean().backward()
    grads = {name: [p.grad for p in pm.adapter_modules[name].parameters() if p.requires_grad] for name in pm.adapters}
    assert all(g is not None and g.abs().sum() > 0 for g in grads["a"])
    assert any(g is not None and g.abs().sum() > 0 for g in grads["b"])
    assert all(g is None or g.abs().sum() == 0 for g in grads["c"]), "an adapter no row uses gets no gradient"


def test_multi_adapter_training_in_one_batch(tiny):
    """Two adapters trained in one batch over one frozen base, each on its own rows' targets."""
    model, batch = tiny("bert", task="classification")
    pm = peftlab.apply(model, "lora[r=4,targets=query|value]", adapter_name="t1", modules_to_save=["classifier"])
    pm.add_adapter("t2", peftlab.LoraConfig(r=4, targets=["query", "value"], modules_to_save=["classifier"]))
    pm.set_adapter(["t1", "t2"])
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    ids = torch.cat([batch["input_ids"], batch["input_ids"]])
    mask = torch.cat([batch["attention_mask"], batch["attention_mask"]])
    names = ["t1"] * 3 + ["t2"] * 3
    labels = torch.tensor([0, 0, 0, 1, 1, 1])  # the two tasks want opposite answers on the same text
    for _ in range(30):
        loss = pm(input_ids=ids, attention_mask=mask, adapter_names=names, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = pm(input_ids=ids, attention_mask=mask, adapter_names=names).logits.argmax(-1)
    assert pred.tolist() == labels.tolist()


def test_routing_sequential_matches_loop():
    slot = torch.tensor([1, -1, 0, 1])
    x = torch.randn(4, 3)
    doubler, negate = (lambda t: 2 * t), (lambda t: -t)
    out = _routed_sequential([[doubler], [negate]], slot, x, None, input_site=True)
    torch.testing.assert_close(out, torch.stack([-x[0], x[1], 2 * x[2], -x[3]]))


def test_delete_adapter_removes_hooks(three_adapters):
    pm, batch = three_adapters
    for name in list(pm.adapters):
        pm.delete_adapter(name)
    assert pm.adapters == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in pm.model.modules())


def test_gradient_checkpointing_with_mixed_batch(tiny):
    model, batch = tiny("llama", task="causal-lm")
    pm = peftlab.apply(model, "lora[r=4]", adapter_name="a")
    pm.add_adapter("b", "lora[r=4]")
    randomize_adapter(pm, "a", seed=1)
    randomize_adapter(pm, "b", seed=2)
    pm.set_adapter(["a", "b"])
    names = ["a", "b", "a"]

    def grads():
        for p in pm.parameters():
            p.grad = None
        pm.train()
        pm(**batch, labels=batch["input_ids"], adapter_names=names).loss.backward()
        return [p.grad.clone() for p in pm.parameters() if p.requires_grad]

    plain = grads()
    pm.gradient_checkpointing_enable()
    checkpointed = grads()
    for g1, g2 in zip(plain, checkpointed):
        torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_torch_compile_sees_hooks(tiny):
    model, batch = tiny("llama")
    pm = peftlab.apply(model, "lora[r=4]")
    randomize_adapter(pm)
    with torch.no_grad():
        eager = first_output(pm(**batch))
        compiled = torch.compile(pm.model, backend="aot_eager")
        torch.testing.assert_close(first_output(compiled(**batch)), eager, atol=1e-5, rtol=1e-5)


def test_mixed_batch_with_lora_dropout_trains_on_the_gathered_path(monkeypatch):
    """Training with dropout stays on the gathered path: base rows are exact, adapter rows are
    dropped (unbiased: the mean over many draws is the eval output, the delta being linear in x)."""
    from peftlab.methods.reparam.lora import LoraLinear

    calls = spy_on_routed(monkeypatch, LoraLinear)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    pm = peftlab.apply(model, "lora[r=4,dropout=0.3,targets=0]", adapter_name="a")
    pm.add_adapter("b", "lora[r=2,dropout=0.3,targets=0]")
    randomize_adapter(pm, "a", std=0.5, seed=1)
    randomize_adapter(pm, "b", std=0.5, seed=2)
    x = torch.randn(3, 16)
    names = ["a", None, "b"]
    pm.eval()
    with torch.no_grad(), pm.disable_adapters():
        base = model(x)
    with torch.no_grad():
        expected = pm(x, adapter_names=names)
    pm.train()
    pm.set_adapter(["a", "b"])
    draws = [pm(x, adapter_names=names) for _ in range(400)]
    assert calls and all(calls)
    torch.testing.assert_close(draws[0][1], base[1], atol=0, rtol=0)
    assert not torch.allclose(draws[0], draws[1])
    mean = torch.stack(draws).mean(0).detach()
    assert (mean - expected).abs().max() < 0.1 * (expected - base).abs().max()
    draws[0].sum().backward()
    grads = {n: pm.adapter_modules[n]["0"].lora_A.weight.grad for n in ("a", "b")}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_repeated_mixed_calls_follow_weight_updates_and_adapter_changes(three_adapters):
    """The routing and the gathered per-row weights are reused between calls with the same
    adapter_names (a decoding loop); in-place updates, new routes and replaced adapters must show."""
    pm, batch = three_adapters
    names = ["a", "c", None]
    with torch.no_grad():
        first = _out(pm, batch, adapter_names=names)
        assert torch.equal(_out(pm, batch, adapter_names=names), first)  # the cached path gives the same
    randomize_adapter(pm, "a", seed=11)  # in place: same tensors, new versions
    assert_mixed_batch_equals_per_adapter(pm, names, batch)
    with torch.no_grad():
        assert not torch.allclose(_out(pm, batch, adapter_names=names)[0], first[0])
    assert_mixed_batch_equals_per_adapter(pm, ["c", "a", "b"], batch)
    # Alternating routings keep their caches side by side; an update must still reach both.
    with torch.no_grad():
        _out(pm, batch, adapter_names=names), _out(pm, batch, adapter_names=["b", "b", "a"])
    randomize_adapter(pm, "a", seed=13)
    assert_mixed_batch_equals_per_adapter(pm, ["b", "b", "a"], batch)
    assert_mixed_batch_equals_per_adapter(pm, names, batch)
    pm.delete_adapter("c")
    pm.add_adapter("c", "lora[r=5,targets=q_proj|v_proj]")
    randomize_adapter(pm, "c", seed=12)
    assert_mixed_batch_equals_per_adapter(pm, names, batch)
