"""peftlab.compose.merge: the math against direct formulas, LoRA results equal to Hugging Face PEFT's
``add_weighted_adapter`` (cat / svd / ties_svd), LoRA-family sources of any rank, parameter-space
merges (ia3, houlsby, bitfit), and bad input refused with ``pm`` unchanged."""

from __future__ import annotations

import itertools

import pytest
import torch

import peftlab
from conftest import IDS, main_output, randomize_adapter
from test_compose_blocks import _pm
from peftlab.compose import merge
from peftlab.compose.merge import (
    dare, dare_drop, disjoint_mean, exact_factors, task_arithmetic, ties, trim, truncated_factors,
)
from peftlab.zoo import tiny_model

peft = pytest.importorskip("peft")

TOL = 1e-5


# -- the math on random tensors --------------------------------------------------------------------
def _tensors(n=3, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_task_arithmetic_is_the_weighted_sum_and_negative_weights_negate():
    a, b, c = _tensors()
    assert torch.allclose(task_arithmetic([a, b, c], [0.5, -1.0, 2.0]), 0.5 * a - b + 2 * c)
    assert torch.allclose(task_arithmetic([a, b], [1.0, -1.0]) + b, a)


def test_trim_keeps_the_k_largest_magnitudes():
    (t,) = _tensors(1, (4, 5))
    out = trim(t, 0.3)  # k = 6 of 20
    flat = sorted(range(20), key=lambda i: -abs(t.reshape(-1)[i].item()))
    expected = torch.zeros(20)
    for i in flat[:6]:
        expected[i] = t.reshape(-1)[i]
    assert torch.equal(out.reshape(-1), expected)


def test_ties_against_an_entry_by_entry_loop():
    ts, w, density = _tensors(3, (3, 4), seed=1), [0.7, 1.3, -0.4], 0.5
    trimmed = [trim(t, density) for t in ts]
    got = ties(ts, w, density)
    for idx in itertools.product(range(3), range(4)):
        vals = [t[idx].item() for t in trimmed]
        gamma = 1.0 if sum(vals) >= 0 else -1.0  # elected sign of the unweighted trimmed values
        keep = [i for i, v in enumerate(vals) if v != 0 and (v > 0) == (gamma > 0)]
        expected = sum(w[i] * vals[i] for i in keep) / max(1, len(keep))
        assert abs(got[idx].item() - expected) < 1e-6, idx
    # "frequency": the sign that most tasks have
    f = disjoint_mean(trimmed, w, "frequency")
    for idx in itertools.product(range(3), range(4)):
        vals = [t[idx].item() for t in trimmed]
        gamma = 1.0 if sum((v > 0) - (v < 0) for v in vals) >= 0 else -1.0
        keep = [i for i, v in enumerate(vals) if v != 0 and (v > 0) == (gamma > 0)]
        assert abs(f[idx].item() - sum(w[i] * vals[i] for i in keep) / max(1, len(keep))) < 1e-6


def test_dare_drops_and_rescales_with_a_seeded_mask():
    (t,) = _tensors(1, (200, 100))
    out = dare_drop(t, 0.3, torch.Generator().manual_seed(7))
    mask = torch.bernoulli(torch.full(t.shape, 0.3), generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, t * mask / 0.3)
    assert abs((out != 0).float().mean().item() - 0.3) < 0.01  # p = 0.7 of the entries dropped
    a, b = _tensors(2, (8, 8))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(dare([a, b], [0.5, 0.5], 0.5, g1), dare([a, b], [0.5, 0.5], 0.5, g2))
    assert torch.allclose(dare([a, b], [0.5, 2.0], 1.0, g1), 0.5 * a + 2 * b)  # density 1: task arithmetic


def test_factors_are_exact_at_the_numerical_rank_and_best_when_truncated():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(12, 3, generator=g) @ torch.randn(3, 9, generator=g)
    b, a = exact_factors(low)
    assert b.shape == (12, 3) and a.shape == (3, 9)
    assert (b @ a - low).abs().max() < 1e-5
    full = torch.randn(12, 9, generator=g)
    u, s, vh = torch.linalg.svd(full.double())
    b, a = truncated_factors(full, 4)
    assert ((b @ a).double() - (u[:, :4] * s[:4]) @ vh[:4]).abs().max() < 1e-5
    b, a = truncated_factors(full, 20)  # rank above min(out, in): zero-padded, exact
    assert b.shape == (12, 20) and (b @ a - full).abs().max() < 1e-5


# -- LoRA results equal PEFT's add_weighted_adapter -------------------------------------------------
def _peft_pair(kind):
    """Two randomized PEFT LoRA adapters ("first" r=4, "second" r=8) of different targets on a tiny model."""
    model = tiny_model(kind)
    targets = {"llama": ({"q_proj", "v_proj"}, {"v_proj", "o_proj"}), "gpt2": ({"c_attn"}, {"c_attn", "c_proj"})}[kind]
    fan = kind == "gpt2"
    torch.manual_seed(0)  # PEFT draws lora_A from the global generator: fix it, so the data do not depend on test order
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets[0], fan_in_fan_out=fan),
                             adapter_name="first")
    pm.add_adapter("second", peft.LoraConfig(r=8, lora_alpha=4, target_modules=targets[1], fan_in_fan_out=fan))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return pm


def _ours_from(peft_model, tmp_path, kind):
    peft_model.save_pretrained(tmp_path / "files")  # "first" at the root (PEFT: in a sub-directory), "second"
    first = tmp_path / "files" / "first"
    pm = peftlab.load(tiny_model(kind), first if first.is_dir() else tmp_path / "files", adapter_name="a")
    pm.load_adapter(tmp_path / "files" / "second", "b")
    return pm


def _peft_deltas(peft_model, name):
    out = {}
    for n, m in peft_model.base_model.model.named_modules():
        if hasattr(m, "lora_A") and name in m.lora_A:
            dw = m.get_delta_weight(name).detach()
            out[n] = dw.T if getattr(m, "fan_in_fan_out", False) else dw
    return out


def _our_deltas(pm, name):
    with torch.no_grad():
        return {m: weight_out_in_delta(pm, m, d) for m, d in pm.placed(name).items()}


def weight_out_in_delta(pm, module_name, delta):
    base = pm.model.get_submodule(module_name)
    dp = delta.delta_params(base)["weight"]
    return dp.T if type(base).__name__ == "Conv1D" else dp


CASES = [  # (ours, PEFT's combination_type, options)
    ("linear", "cat", {}),
    ("svd", "svd", {"rank": 6}),
    ("svd", "svd", {}),  # default rank: the largest source rank (8), as PEFT's svd_rank=None
    ("ties", "ties_svd", {"rank": 6, "density": 0.5}),
]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("ours,theirs,options", CASES, ids=[f"{c[0]}-{c[1]}-{len(c[2])}" for c in CASES])
def test_lora_merge_equals_peft_add_weighted_adapter(tmp_path, kind, ours, theirs, options):
    peft_model = _peft_pair(kind)
    pm = _ours_from(peft_model, tmp_path, kind)
    weights = [0.7, -1.3]
    merge(pm, ["a", "b"], weights, ours, name="ab", **options)
    peft_model.add_weighted_adapter(
        ["first", "second"], weights, "ab", combination_type=theirs, svd_rank=options.get("rank"), density=options.get("density"))
    mine, reference = _our_deltas(pm, "ab"), _peft_deltas(peft_model, "ab")
    assert set(mine) == set(reference)
    diffs = {m: (mine[m] - reference[m]).abs().max().item() for m in mine}
    assert max(diffs.values()) <= TOL, diffs
    cfg = pm.configs["ab"]
    assert cfg.method == "lora" and cfg.alpha == cfg.r
    assert cfg.r == (12 if ours == "linear" else options.get("rank", 8))  # cat: r = 4 + 8, as PEFT


def test_merged_lora_loads_in_peft_with_the_same_outputs(tmp_path):
    peft_model = _peft_pair("llama")
    pm = _ours_from(peft_model, tmp_path, "llama")
    merge(pm, ["a", "b"], [0.5, 0.5], "svd", name="ab", rank=5)
    pm.set_adapter("ab")
    ours = main_output(pm)
    pm.save(tmp_path / "ab", adapter_name="ab")
    theirs = main_output(peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ab"))
    assert (ours - theirs).abs().max().item() <= TOL


def test_linear_merge_is_the_exact_weighted_sum_of_the_outputs_deltas():
    """linear: the merged adapter's ΔW is Σ wᵢ ΔWᵢ, so its output equals the base with W + Σ wᵢ ΔWᵢ."""
    model = tiny_model("llama")
    pm = _pm({"a": "lora[r=2,alpha=4,targets=q_proj|v_proj]", "b": "lora[r=3,alpha=3,targets=v_proj]"}, model, std=0.1)
    before = {n: t.clone() for n, t in pm.model.state_dict().items()}
    merge(pm, ["a", "b"], [2.0, -0.5], "task_arithmetic", name="ab")
    assert {n: t for n, t in pm.model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(before[n], t) for n, t in pm.model.state_dict().items())  # base untouched
    pm.set_adapter("ab")
    merged_out = main_output(pm)
    reference = tiny_model("llama")
    with torch.no_grad():
        for name in ("a", "b"):
            w = 2.0 if name == "a" else -0.5
            for m, d in pm.placed(name).items():
                base = pm.model.get_submodule(m)
                reference.get_submodule(m).weight.add_(w * d.delta_params(base)["weight"])
    assert (merged_out - main_output(reference)).abs().max().item() <= TOL


def test_lora_family_of_different_kinds_and_ranks_combine_in_weight_space():
    """LoRA r=2 + LoHa + DoRA by svd: the result is the rank-k truncation of Σ wᵢ ΔWᵢ, computed here
    directly from each delta's merge ΔW."""
    pm = _pm({"lora": "lora[r=2,targets=q_proj|v_proj]", "loha": "loha[r=2,targets=v_proj|k_proj]",
              "dora": "dora[r=3,targets=q_proj]"}, std=0.1)
    weights = [0.5, 1.0, -0.7]
    merge(pm, pm.adapters, weights, "svd", name="all", rank=4)
    got = _our_deltas(pm, "all")
    assert set(got) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj")}
    for m, dw in got.items():
        total = sum(w * weight_out_in_delta(pm, m, pm.placed(n)[m]) for n, w in zip(["lora", "loha", "dora"], weights)
                    if m in pm.placed(n))
        u, s, vh = torch.linalg.svd(total.double())
        assert (dw.double() - (u[:, :4] * s[:4]) @ vh[:4]).abs().max() <= TOL, m
    assert pm.report("all")["ranks"] and all(r == 4 for r in pm.report("all")["ranks"].values())


def test_dare_is_seeded_and_dare_ties_runs():
    pm = _pm({"a": "lora[r=4,targets=q_proj]", "b": "lora[r=4,targets=q_proj]"}, tiny_model("llama"), std=0.1)
    merge(pm, ["a", "b"], [1.0, 1.0], "dare", name="d1", density=0.5, seed=3, rank=8)
    merge(pm, ["a", "b"], [1.0, 1.0], "dare", name="d2", density=0.5, seed=3, rank=8)
    merge(pm, ["a", "b"], [1.0, 1.0], "dare", name="d3", density=0.5, seed=4, rank=8)
    merge(pm, ["a", "b"], [1.0, 1.0], "dare", name="full", density=1.0, rank=8)
    merge(pm, ["a", "b"], [1.0, 1.0], "svd", name="svd", rank=8)
    merge(pm, ["a", "b"], [1.0, 1.0], "dare_ties", name="dt", density=0.5, seed=3, rank=8)
    d = {n: _our_deltas(pm, n) for n in ("d1", "d2", "d3", "full", "svd", "dt")}
    m = "model.layers.0.self_attn.q_proj"
    assert torch.equal(d["d1"][m], d["d2"][m]) and not torch.allclose(d["d1"][m], d["d3"][m])
    assert (d["full"][m] - d["svd"][m]).abs().max() <= TOL  # keep everything: the plain sum
    assert not torch.allclose(d["dt"][m], d["d1"][m])


# -- other parameterisations: task arithmetic on the parameters -------------------------------------
def test_ia3_combines_its_vectors_about_the_identity():
    """ia3: l = 1 + Σ wᵢ (lᵢ − 1), so ΔW = Σ wᵢ ΔWᵢ exactly (PEFT's Σ wᵢ lᵢ when Σ wᵢ = 1)."""
    pm = _pm({"a": "ia3", "b": "ia3"}, tiny_model("llama"), std=0.1)
    merge(pm, ["a", "b"], [1.5, -0.5], "task_arithmetic", name="ab")
    merge(pm, ["a", "b"], [0.3, 0.7], "linear", name="avg")
    assert pm.configs["ab"].method == "ia3"
    for m, d in pm.placed("ab").items():
        la, lb = pm.placed("a")[m].ia3_l, pm.placed("b")[m].ia3_l
        assert torch.allclose(d.ia3_l, 1 + 1.5 * (la - 1) - 0.5 * (lb - 1), atol=1e-6)
        assert torch.allclose(pm.placed("avg")[m].ia3_l, 0.3 * la + 0.7 * lb, atol=1e-6)
        base = pm.model.get_submodule(m)
        expect = 1.5 * pm.placed("a")[m].delta_params(base)["weight"] - 0.5 * pm.placed("b")[m].delta_params(base)["weight"]
        assert (d.delta_params(base)["weight"] - expect).abs().max() <= TOL


def test_houlsby_parameters_are_combined_as_a_weighted_sum():
    pm = _pm({"a": "houlsby[r=4]", "b": "houlsby[r=4]"}, tiny_model("llama"), std=0.1)
    merge(pm, ["a", "b"], [0.25, 0.75], "linear", name="ab")
    pa, pb = dict(pm.adapter_modules["a"].named_parameters()), dict(pm.adapter_modules["b"].named_parameters())
    for n, p in pm.adapter_modules["ab"].named_parameters():
        assert torch.allclose(p, 0.25 * pa[n] + 0.75 * pb[n], atol=1e-7), n


def test_bitfit_task_arithmetic_adds_the_bias_deltas():
    from conftest import tiny_net

    pm = _pm({"a": "bitfit", "b": "bitfit"}, tiny_net("bert"), std=0.1)
    merge(pm, ["a", "b"], [1.0, 1.0], "task_arithmetic", name="ab")
    for m, d in pm.placed("ab").items():
        base = pm.model.get_submodule(m)
        got = d.delta_params(base)
        for k, v in got.items():
            expect = pm.placed("a")[m].delta_params(base)[k] + pm.placed("b")[m].delta_params(base)[k]
            assert torch.allclose(v, expect, atol=1e-6), (m, k)


# -- bad input: clear errors, pm unchanged ----------------------------------------------------------
def _snapshot(pm):
    return (pm.adapters, pm.active_adapters, {n: c.to_dict() for n, c in pm.configs.items()},
            {n: t.clone() for n, t in pm.state_dict().items()}, len(pm._dispatchers))


def _same(a, b):
    return a[:3] == b[:3] and a[3].keys() == b[3].keys() and all(torch.equal(a[3][k], b[3][k]) for k in a[3]) and a[4] == b[4]


BAD = [
    (["a", "b"], [0.5, 0.5], "slerp", {"name": "x"}, ValueError, "unknown method 'slerp'"),
    (["a", "b"], [0.5], "linear", {"name": "x"}, ValueError, "1 weights for 2 adapters"),
    (["a", "b"], [0.5, 0.5], "linear", {"name": "a"}, ValueError, "is one of the sources"),
    (["a", "a"], [0.5, 0.5], "linear", {"name": "x"}, ValueError, "listed more than once"),
    (["a", "b"], [0.5, 0.5], "linear", {"name": "h"}, ValueError, "exists already"),
    (["a", "zz"], [0.5, 0.5], "linear", {"name": "x"}, KeyError, "no adapter named 'zz'"),
    (["a", "h"], [0.5, 0.5], "linear", {"name": "x"}, ValueError, "'h' is not (only) a reparameterized method"),
    (["h", "h2"], [0.5, 0.5], "linear", {"name": "x"}, ValueError, "their configs differ (r: 4 vs 8)"),
    (["h", "h3"], [0.5, 0.5], "ties", {"name": "x", "density": 0.5}, ValueError, "no weight delta"),
    (["a", "b"], [0.5, 0.5], "ties", {"name": "x"}, ValueError, "needs density= in (0, 1]"),
    (["a", "b"], [0.5, 0.5], "dare", {"name": "x", "density": 1.5}, ValueError, "needs density= in (0, 1]"),
    (["a", "b"], [0.5, 0.5], "linear", {"name": "x", "rank": 4}, ValueError, "rank= applies to"),
    (["a", "b"], [0.5, 0.5], "svd", {"name": "x", "rank": 0}, ValueError, "rank=0 is invalid"),
    (["a", "b"], [0.5, 0.5], "svd", {"name": "x", "density": 0.5}, ValueError, "density= applies to"),
    (["a", "head"], [0.5, 0.5], "svd", {"name": "x"}, ValueError, "copy of 'lm_head' (modules_to_save)"),
    (["a", "b"], [0.5, float("nan")], "linear", {"name": "x"}, ValueError, "finite numbers"),
]


@pytest.mark.parametrize("adapters,weights,method,options,error,message", BAD, ids=[b[5][:30] for b in BAD])
def test_bad_input_is_refused_and_pm_is_unchanged(adapters, weights, method, options, error, message):
    pm = peftlab.apply(tiny_model("llama"), "lora[r=2,targets=q_proj]", adapter_name="a")
    pm.add_adapter("b", "lora[r=4,targets=v_proj]")
    pm.add_adapter("h", "houlsby[r=4]")
    pm.add_adapter("h2", "houlsby[r=8]")
    pm.add_adapter("h3", "houlsby[r=4]")
    pm.add_adapter("head", peftlab.LoraConfig(r=2, targets=["q_proj"], modules_to_save=["lm_head"]))
    randomize_adapter(pm, "a")
    pm.set_adapter(["a", "b"])
    before = _snapshot(pm)
    with pytest.raises(error, match=pytest.importorskip("re").escape(message)):
        merge(pm, adapters, weights, method, **options)
    assert _same(before, _snapshot(pm))


def test_merge_refuses_while_adapters_are_merged():
    pm = peftlab.apply(tiny_model("llama"), "lora[r=2,targets=q_proj]", adapter_name="a")
    pm.add_adapter("b", "lora[r=2,targets=q_proj]")
    pm.merge(["a"])
    with pytest.raises(RuntimeError, match="unmerge"):
        merge(pm, ["a", "b"], [1, 1], "linear", name="ab")
    assert "ab" not in pm.adapters
    assert main_output(pm).shape[0] == IDS.shape[0]


# -- every registered method: merged by its rule, or refused ----------------------------------------
def _applicable(spec):
    for kind in ("llama", "bert"):
        model = tiny_model(kind)
        if all(r.met(model) for r in spec.needs):
            return model
    raise AssertionError(f"{spec.name}: no tiny model meets its needs")


@pytest.mark.parametrize("method", peftlab.list_methods())
def test_every_method_combines_by_its_rule(method):
    """Reparameterized methods: ``linear`` gives ΔW = Σ wᵢ ΔWᵢ (as a LoRA) to 1e-5. Others: weights
    [1, 0] give adapter "a" back (θ₀ + 1·(θ_a − θ₀) = θ_a) and ``svd`` is refused."""
    spec = peftlab.get_method(method)
    pm = _pm({"a": spec.example, "b": spec.example}, _applicable(spec), std=0.05)
    if spec.family == "reparam":
        merge(pm, ["a", "b"], [0.6, -0.4], "linear", name="ab")
        got = _our_deltas(pm, "ab")
        for m, dw in got.items():
            direct = sum(w * weight_out_in_delta(pm, m, pm.placed(n)[m]) for n, w in (("a", 0.6), ("b", -0.4)))
            assert (dw - direct).abs().max() <= TOL, m
        assert pm.configs["ab"].method == "lora"
        return
    merge(pm, ["a", "b"], [1.0, 0.0], "linear", name="ab")
    pm.set_adapter("a")
    expected = main_output(pm)
    pm.set_adapter("ab")
    assert (main_output(pm) - expected).abs().max().item() <= TOL and pm.configs["ab"].to_dict() == pm.configs["a"].to_dict()
    with pytest.raises(ValueError, match="no weight delta"):
        merge(pm, ["a", "b"], [0.5, 0.5], "svd", name="s")
