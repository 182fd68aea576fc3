"""The routing of a call belongs to the call (core/dispatch.AdapterState.routing is a context
variable): one PeftModel called from several threads at once, each with its own adapter_names, gives
each thread what a lone call gives."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import one_thread

import peftlab
from peftlab.zoo import tiny_model

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def _model_with_adapters():
    torch.manual_seed(0)
    pm = peftlab.apply(tiny_model("llama", "causal-lm"), "lora[r=4,targets=q_proj|v_proj]", adapter_name="r4")
    pm.add_adapter("r8", "lora[r=8,alpha=4,targets=q_proj|v_proj|o_proj]")
    pm.add_adapter("ia3", "ia3")
    for p in pm.adapter_modules.parameters():  # B = 0 and (IA)^3 = 1 at init: make every adapter count
        p.data.normal_(0, 0.3) if p.dim() > 1 else p.data.uniform_(0.5, 1.5)
    pm.set_adapter([])
    return pm.eval()


ROUTES = [
    ["r4", "r8", None, "ia3"],
    ["r8", "r8", "r4", "r4"],
    [None, "ia3", "ia3", "r8"],
    ["ia3", None, "r4", None],
    None,  # no routing at all: the base model (no adapter is active)
]


def test_threads_with_different_adapter_names_each_get_their_lone_result():
    pm = _model_with_adapters()
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lone = [pm(input_ids=ids, adapter_names=r).logits for r in ROUTES]
    for a in range(len(ROUTES) - 1):  # the routes really differ, so a mix-up would show
        assert (lone[a] - lone[-1]).abs().max() > 1e-3
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(ROUTES))}
    errors: list[BaseException] = []
    start = threading.Barrier(len(ROUTES))

    def work(i: int) -> None:
        try:
            start.wait()
            with torch.no_grad():
                for _ in range(15):
                    results[i].append(pm(input_ids=ids, adapter_names=ROUTES[i]).logits)
        except BaseException as e:  # reported below, with the thread's route
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(ROUTES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, outs in results.items():
        assert len(outs) == 15
        for out in outs:
            torch.testing.assert_close(out, lone[i], rtol=0, atol=1e-5, msg=f"route {ROUTES[i]}")


def test_a_thread_that_never_routed_sees_no_routing_of_another_thread():
    pm = _model_with_adapters()
    seen = []
    inside = threading.Event()
    release = threading.Event()

    def hold(module, args):  # hold a routed call in flight, inside the model
        inside.set()
        release.wait(5)

    handle = pm.model.model.layers[0].register_forward_pre_hook(hold)
    ids = torch.randint(3, 128, (4, 5))
    t = threading.Thread(target=lambda: pm(input_ids=ids, adapter_names=ROUTES[0]))
    t.start()
    assert inside.wait(5)
    seen.append(pm._state.routing)  # this (main) thread: nothing routed here
    release.set()
    t.join()
    handle.remove()
    assert seen == [None]
