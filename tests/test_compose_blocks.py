"""Composition blocks (peftlab.Stack / Parallel / Average): the data (nesting, JSON, validation), and
what each computes per site kind at one hooked module against direct formulas for LoRA (parallel),
houlsby / pfeiffer (output) and ia3 (output and input); whole-model checks; the compiled plan."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import peftlab
from conftest import IDS, first_output, main_output, randomize_adapter
from peftlab import Average, Parallel, Stack
from peftlab.compose import Block, merge
from peftlab.zoo import tiny_model

ATTN = "model.layers.1.self_attn"
X = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(9))


def _pm(configs: dict, model=None, std: float = 0.2):
    """``model`` (default: a tiny Llama) with the adapters ``{name: config}`` added, the i-th moved
    away from init by noise of seed i + 1."""
    names = list(configs)
    pm = peftlab.apply(model if model is not None else tiny_model("llama"), configs[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, configs[n])
    for i, n in enumerate(names):
        randomize_adapter(pm, n, seed=1 + i, std=std)
    return pm


def _at(pm, module: str, block, x: torch.Tensor = X):
    """(output of ``module`` on x with ``block`` active, the base module's own output)."""
    mod = pm.model.get_submodule(module)
    pm.set_adapter(block)
    with torch.no_grad():
        out = mod(x)
        with pm.disable_adapters():
            base = mod(x)
    return out, base


def _close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol


# -- the direct formulas ---------------------------------------------------------------------------
def lora_delta(pm, adapter, module, x):
    """s · x Aᵀ Bᵀ."""
    d = pm.placed(adapter)[module]
    return d.scaling * x @ d.lora_A.weight.T @ d.lora_B.weight.T


def houlsby(pm, adapter, module, y):
    """y + W_up relu(W_down y + b_down) + b_up."""
    d = pm.placed(adapter)[module]
    return y + F.relu(y @ d.adapter_down.weight.T + d.adapter_down.bias) @ d.adapter_up.weight.T + d.adapter_up.bias


def ia3_vec(pm, adapter, module):
    return pm.placed(adapter)[module].ia3_l


# -- the data --------------------------------------------------------------------------------------
def test_blocks_nest_and_round_trip_through_json():
    tree = Stack("a", Average("b", Parallel("c", "d"), weights=[1, 3]), "e")
    again = Block.from_dict(json.loads(json.dumps(tree.to_dict())))
    assert again == tree and isinstance(again, Stack) and isinstance(again.children[1], Average)
    assert again.children[1].weights == (1.0, 3.0) and again.children[1].normalized() == [0.25, 0.75]
    assert tree.names() == ["a", "b", "c", "d", "e"]
    assert Stack.from_dict(Stack("a", "b").to_dict()) == Stack("a", "b") == Stack(["a", "b"])
    assert Stack("a", "b") != Parallel("a", "b") and Average("a", "b") == Average("a", "b", weights=[1, 1])
    assert repr(tree) == "Stack('a', Average('b', Parallel('c', 'd'), weights=[1.0, 3.0]), 'e')"


@pytest.mark.parametrize("make,message", [
    (lambda: Stack(), "at least one"),
    (lambda: Parallel("a", Stack("b", "a")), "['a'] appear more than once"),
    (lambda: Stack("a", 3), "must be an adapter name"),
    (lambda: Average("a", "b", weights=[1]), "1 weights for 2 children"),
    (lambda: Average("a", "b", weights=[1, -1]), "sum to 0"),
    (lambda: Average("a", "b", weights=[1, float("inf")]), "finite"),
    (lambda: Block.from_dict({"block": "fuse", "children": ["a"]}), "not a composition block"),
    (lambda: Stack.from_dict(Average("a", "b").to_dict()), "Stack.from_dict got a 'average' block"),
    (lambda: Block.from_dict({"block": "stack", "children": ["a"], "sizes": [1]}), "unknown keys ['sizes']"),
])
def test_bad_blocks_are_refused(make, message):
    with pytest.raises((ValueError, TypeError), match=pytest.importorskip("re").escape(message)):
        make()


# -- parallel sites (LoRA) -------------------------------------------------------------------------
def test_lora_blocks_at_a_parallel_site():
    pm = _pm({n: "lora[r=4,alpha=8,targets=q_proj|v_proj]" for n in "abc"})
    q = f"{ATTN}.q_proj"
    da, db, dc = (lora_delta(pm, n, q, X) for n in "abc")
    for block in (["a", "b"], Stack("a", "b"), Parallel("a", "b")):  # Stack and Parallel coincide: Δ summed
        out, y = _at(pm, q, block)
        assert _close(out, y + da + db), block
    out, y = _at(pm, q, Average("a", "b", weights=[1, 3]))
    assert _close(out, y + 0.25 * da + 0.75 * db)
    out, y = _at(pm, q, Average("a", Parallel("b", "c"), weights=[0.5, 0.5]))
    assert _close(out, y + 0.5 * da + 0.5 * (db + dc))
    out, y = _at(pm, q, Average("a"))
    assert _close(out, y + da)


# -- output sites (houlsby, pfeiffer) --------------------------------------------------------------
def test_houlsby_blocks_at_an_output_site():
    pm = _pm({n: "houlsby[r=8]" for n in ("h1", "h2", "h3")})
    o = f"{ATTN}.o_proj"
    with pm.disable_adapters():
        y = pm.model.get_submodule(o)(X).detach()
    g = {n: (lambda t, n=n: houlsby(pm, n, o, t)) for n in ("h1", "h2", "h3")}
    with torch.no_grad():
        expected = {
            Stack("h1", "h2"): g["h2"](g["h1"](y)),
            Stack("h2", "h1"): g["h1"](g["h2"](y)),
            Parallel("h1", "h2"): y + (g["h1"](y) - y) + (g["h2"](y) - y),
            Average("h1", "h2", weights=[0.2, 0.8]): 0.2 * g["h1"](y) + 0.8 * g["h2"](y),
            Stack("h1", Average("h2", "h3")): 0.5 * g["h2"](g["h1"](y)) + 0.5 * g["h3"](g["h1"](y)),
            Parallel("h1", Stack("h2", "h3")): y + (g["h1"](y) - y) + (g["h3"](g["h2"](y)) - y),
        }
    for block, want in expected.items():
        out, base = _at(pm, o, block)
        assert _close(base, y) and _close(out, want), block
    assert not _close(expected[Stack("h1", "h2")], expected[Stack("h2", "h1")])  # order matters
    out, _ = _at(pm, o, ["h1", "h2"])  # a list is a Stack
    assert _close(out, expected[Stack("h1", "h2")])


def test_pfeiffer_and_houlsby_average_where_only_one_acts():
    """Average: a child with nothing at a module counts as the identity there (Σ ŵᵢ = 1)."""
    pm = _pm({"p": "pfeiffer[r=8]", "h": "houlsby[r=8]"})
    down, o = "model.layers.0.mlp.down_proj", f"{ATTN}.o_proj"
    x_down = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    block = Average("p", "h", weights=[0.4, 0.6])
    out, y = _at(pm, down, block, x_down)
    with torch.no_grad():
        assert _close(out, 0.4 * houlsby(pm, "p", down, y) + 0.6 * houlsby(pm, "h", down, y))
        out, y = _at(pm, o, block)  # pfeiffer is on the FFN only
        assert _close(out, 0.4 * y + 0.6 * houlsby(pm, "h", o, y))
        out, y = _at(pm, o, Parallel("p", "h"))
        assert _close(out, houlsby(pm, "h", o, y))


# -- ia3: output and input sites --------------------------------------------------------------------
def test_ia3_blocks_at_output_and_input_sites():
    pm = _pm({"i1": "ia3", "i2": "ia3"})
    k, down = f"{ATTN}.k_proj", "model.layers.1.mlp.down_proj"
    l1, l2 = ia3_vec(pm, "i1", k), ia3_vec(pm, "i2", k)
    with torch.no_grad():
        for block, scale in [(Stack("i1", "i2"), l1 * l2), (Parallel("i1", "i2"), 1 + (l1 - 1) + (l2 - 1)),
                             (Average("i1", "i2", weights=[3, 1]), 0.75 * l1 + 0.25 * l2)]:
            out, y = _at(pm, k, block)
            assert _close(out, scale * y), block
        m1, m2 = ia3_vec(pm, "i1", down), ia3_vec(pm, "i2", down)
        w = pm.model.get_submodule(down).weight
        x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4))
        for block, xs in [(Stack("i1", "i2"), m2 * (m1 * x)), (Parallel("i1", "i2"), x + (m1 * x - x) + (m2 * x - x)),
                          (Average("i1", "i2", weights=[3, 1]), 0.75 * m1 * x + 0.25 * m2 * x)]:
            out, _ = _at(pm, down, block, x)
            assert _close(out, xs @ w.T), block


def test_average_of_a_parallel_and_an_output_delta_at_one_module():
    """Per site kind: the parallel step (ŵ_l Δ_l) acts first, then the output step Σ ŵᵢ gᵢ(t),
    the LoRA child being the identity there."""
    pm = _pm({"l": "lora[r=4,targets=o_proj]", "h": "houlsby[r=8]"})
    o = f"{ATTN}.o_proj"
    out, y = _at(pm, o, Average("l", "h", weights=[1, 1]))
    with torch.no_grad():
        t = y + 0.5 * lora_delta(pm, "l", o, X)
        assert _close(out, 0.5 * t + 0.5 * houlsby(pm, "h", o, t))


# -- whole model -----------------------------------------------------------------------------------
def test_whole_model_average_of_loras_equals_their_linear_merge():
    pm = _pm({n: "lora[r=4,alpha=8,targets=q_proj|v_proj|down_proj]" for n in "ab"})
    pm.set_adapter(["a", "b"])
    listed = main_output(pm)
    for block in (Stack("a", "b"), Parallel("a", "b")):
        pm.set_adapter(block)
        assert _close(main_output(pm), listed)
    pm.set_adapter(Average("a", "b", weights=[0.3, 0.7]))
    averaged = main_output(pm)
    merge(pm, ["a", "b"], [0.3, 0.7], "linear", name="ab")
    pm.set_adapter("ab")
    assert _close(averaged, main_output(pm))
    pm.set_adapter(Average("a"))
    single = main_output(pm)
    pm.set_adapter("a")
    assert _close(single, main_output(pm))
    pm.set_adapter(Average("a", "b"))
    with pm.disable_adapters():
        base = main_output(pm)
    assert _close(base, main_output(tiny_model("llama")))


def test_active_adapters_names_and_active_composition_block():
    pm = _pm({n: "lora[r=2,targets=q_proj]" for n in "abc"})
    block = Stack("c", Average("a", "b"))
    pm.set_adapter(block)
    assert pm.active_adapters == ["c", "a", "b"] and pm.active_composition is block and pm.active_adapter == "c"
    pm.set_adapter(["a", "b"])
    assert pm.active_composition is None and pm.active_adapters == ["a", "b"]
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        pm.set_adapter(Parallel("a", "zz"))
    assert pm.active_adapters == ["a", "b"]


def test_the_plan_is_compiled_once_and_a_single_adapter_runs_its_delta_directly():
    pm = _pm({n: "lora[r=2,targets=q_proj]" for n in "ab"})
    q = f"{ATTN}.q_proj"
    disp = pm._dispatchers[q]
    pm.set_adapter("a")
    plan = disp._plan()
    assert plan.parallel is pm.placed("a")[q] and plan.output is None and plan.input is None  # no wrapper
    main_output(pm)
    assert disp._plan() is plan  # cached: nothing recompiled per call
    pm.set_adapter(Average("a", "b"))
    assert disp._plan() is not plan and disp._plan().parallel is not None


def test_gradients_reach_every_adapter_of_an_average():
    pm = _pm({n: "lora[r=2,targets=q_proj|v_proj]" for n in "abc"})
    pm.set_adapter(Average("a", Stack("b")))
    first_output(pm(input_ids=IDS)).pow(2).mean().backward()
    for name, trained in (("a", True), ("b", True), ("c", False)):
        grads = [p.grad for p in pm.adapter_modules[name].parameters()]
        assert all((g is not None and g.abs().sum() > 0) if trained else g is None for g in grads), name


def test_merge_folds_a_stack_and_refuses_parallel_and_average():
    pm = _pm({n: "lora[r=2,targets=q_proj|v_proj]" for n in "ab"})
    pm.set_adapter(Stack("a", "b"))
    before = main_output(pm)
    pm.merge()
    assert _close(main_output(pm), before)
    with pytest.raises(RuntimeError, match="unmerge"):
        pm.set_adapter(Average("a", "b"))
    pm.unmerge()
    for block in (Parallel("a", "b"), Average("a", "b")):
        pm.set_adapter(block)
        with pytest.raises(RuntimeError, match="peftlab.compose.merge"):
            pm.merge()
        assert pm._state.merged == []


def test_blocks_refuse_model_level_adapters_and_deleting_a_member():
    pm = _pm({"a": "lora[r=2,targets=q_proj]", "b": "lora[r=2,targets=q_proj]", "p": "prefix[length=3]"})
    with pytest.raises(NotImplementedError, match=r"adapters \['p'\] rewrite the model call"):
        pm.set_adapter(Average("a", "p"))
    pm.set_adapter(Stack("a", "p"))  # a Stack applies them in order, as a list does
    pm.set_adapter(Parallel("a", "b"))
    with pytest.raises(ValueError, match="part of the active composition"):
        pm.delete_adapter("a")
    pm.delete_adapter("p")
    assert pm.adapters == ["a", "b"] and pm.active_composition == Parallel("a", "b")
