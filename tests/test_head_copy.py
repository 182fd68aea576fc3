"""``modules_to_save`` copies of a module that adapters already hook: a second adapter's head copy is a
plain module (no dispatcher hooks came with it), its output is its own and its gradient reaches it."""

from __future__ import annotations

import torch

import peftlab
from peftlab.zoo import tiny_model


def test_second_adapters_head_copy_carries_no_hooks_and_trains() -> None:
    model = tiny_model("bert", task="classification")
    pm = peftlab.apply(model, "lora[r=4]", modules_to_save=["classifier"])
    peftlab.apply(pm, "lora[r=4]", adapter_name="b", modules_to_save=["classifier"])
    head_b = pm.adapter_modules["b"]["classifier"].module
    assert not head_b._forward_hooks and not head_b._forward_pre_hooks
    assert model.classifier._forward_hooks  # the base module keeps the dispatcher's hooks
    with torch.no_grad():
        head_b.weight.mul_(3.0)  # b's head now differs from the base head and from a's copy
    ids = torch.randint(5, 100, (2, 6), generator=torch.Generator().manual_seed(0))
    pm.set_adapter("b")
    logits = pm(input_ids=ids).logits
    pooled = {}
    hook = model.classifier.register_forward_hook(lambda m, args, out: pooled.update(x=args[0]))
    pm(input_ids=ids)
    hook.remove()
    torch.testing.assert_close(logits, torch.nn.functional.linear(pooled["x"], head_b.weight, head_b.bias))
    grad = torch.autograd.grad(logits.sum(), [head_b.weight], allow_unused=True)[0]
    assert grad is not None and grad.abs().sum() > 0
    routed = pm(input_ids=ids, adapter_names=["default", "b"]).logits  # a mixed batch: each row its own head
    torch.testing.assert_close(routed[1], logits[1])
    assert not torch.allclose(routed[0], logits[0])
