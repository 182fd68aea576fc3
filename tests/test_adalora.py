"""AdaLoRA (peftlab/methods/reparam/adalora.py): its math against direct formulas, its rank budget
against a direct computation and against Hugging Face PEFT's own ``RankAllocator``, training through
``pm.on_step()`` and peftlab's Trainer, resuming, and files both ways with PEFT (``ADALORA``,
including adapters whose ranks were pruned: ``rank_pattern``). PEFT is a test dependency."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import peftlab
from peftlab.methods.reparam.adalora import AdaLoraConfig, SvdLinear, config_from_peft, set_rank_pattern
from peftlab.train.trainer import Trainer
from peftlab.zoo import tiny_batch, tiny_model

from conftest import assert_gathered_mixed_batch, first_output, randomize_adapter
from peft_both_ways import assert_same_and_adapted, ours_in_peft, peft_in_ours

pytestmark = pytest.mark.filterwarnings("ignore")
TOL = 1e-5
TARGETS = ["q_proj", "v_proj"]


def _llama():
    return tiny_model("llama", task="causal-lm")


def _ours(cfg: str, model=None):
    model = model if model is not None else _llama()
    pm = peftlab.apply(model, cfg)
    return model, pm, {n: d for _, n, d in pm.placements["default"]}


def _hooks(pm, name="default"):
    return pm._training[name][0]


def _out(model, batch):
    """Outputs without labels (PEFT's AdaLoRA forward fails on a loss in inference mode: it looks for
    its trainable adapter to add the orthogonality term)."""
    with torch.no_grad():
        return first_output(model(**{k: v for k, v in batch.items() if k != "labels"}))


# -- the math -------------------------------------------------------------------------------------------
def test_forward_and_merge_match_the_naive_formula():
    """Δh = α/(init_r + 1e-5) · Σ_i m_i Λ_i P[:, i] (Q[i] · x), entry by entry; merging folds the
    same ΔW (Conv1D included); masked singular values count for nothing and not in the rank."""
    for kind, target in (("llama", "q_proj"), ("gpt2", "c_attn")):
        model = tiny_model(kind)
        pm = peftlab.apply(model, f"adalora[init_r=5,target_r=2,alpha=3,targets={target}]")
        randomize_adapter(pm, std=0.3)
        (_, name, d), (_, other, _) = pm.placements["default"]
        set_rank_pattern(pm, "default", {name: [True, False, True, True, False]})
        A, E, B = d.lora_A.detach(), d.lora_E.detach().view(-1), d.lora_B.detach()
        m = d.rank_mask
        s = 3 / (5 + 1e-5)
        x = torch.randn(2, 3, A.shape[1])
        naive = torch.zeros(2, 3, B.shape[0])
        for i in range(5):
            if m[i]:
                naive += s * E[i] * (x @ A[i]).unsqueeze(-1) * B[:, i]
        with torch.no_grad():
            torch.testing.assert_close(d(x), naive, atol=1e-6, rtol=1e-5)
        dw = sum(s * E[i] * torch.outer(B[:, i], A[i]) for i in range(5) if m[i])
        torch.testing.assert_close(d.delta_out_in().detach(), dw, atol=1e-6, rtol=1e-5)
        assert E[1] == 0 and E[4] == 0, "masking sets the pruned Λ_i to 0"
        assert pm.report()["ranks"] == {name: 3, other: 5}
        assert peftlab.parse_method_string(pm.report()["method"]).masks()[name] == [True, False, True, True, False]
        batch = tiny_batch(model, batch=2, seq=6)
        expected = _out(pm, batch)
        merged = pm.merge_and_unload()
        torch.testing.assert_close(_out(merged, batch), expected, atol=1e-5, rtol=1e-4)


def test_counts_for_the_tiny_llama():
    """Trainable = Σ init_r · (in + out + 1) over q_proj (32→32) and v_proj (32→16) of 2 layers;
    changed = the adapted weights; ranks = init_r each at init, identity at init."""
    model, pm, deltas = _ours("adalora[init_r=6,target_r=2,targets=q_proj|v_proj]")
    rep = pm.report()
    assert rep["trainable_params"] == 2 * (6 * (32 + 32 + 1) + 6 * (32 + 16 + 1)) == 1368
    assert rep["changed_params"] == 2 * (32 * 32 + 16 * 32)
    assert rep["ranks"] == {n: 6 for n in deltas} and len(deltas) == 4
    batch = tiny_batch(model, batch=2, seq=6)
    with pm.disable_adapters():
        base = _out(pm, batch)
    torch.testing.assert_close(_out(pm, batch), base, atol=0, rtol=0)


def test_regularizer_matches_the_formula():
    """paper: γ Σ_k (‖P_kᵀP_k − I‖²_F + ‖Q_kQ_kᵀ − I‖²_F); peft: γ · mean over all P and Q of the
    unsquared norms (PEFT's own loss term, computed by PEFT on the same weights)."""
    model, pm, deltas = _ours("adalora[init_r=4,target_r=2,orth_reg_weight=0.3,targets=q_proj|v_proj]")
    randomize_adapter(pm, std=0.4)

    def fro2(M):
        return sum(float(v) ** 2 for v in M.flatten())

    expected = 0.0
    for d in deltas.values():
        A, B = d.lora_A.detach(), d.lora_B.detach()
        expected += fro2(A @ A.T - torch.eye(4)) + fro2(B.T @ B - torch.eye(4))
    assert float(pm.regularizer()) == pytest.approx(0.3 * expected, rel=1e-5)
    pm.regularizer().backward()
    assert all(d.lora_A.grad is not None and d.lora_A.grad.abs().sum() > 0 for d in deltas.values())

    _, pm2, deltas2 = _ours("adalora[init_r=4,target_r=2,orth_reg_weight=0.3,orth_reg=peft,targets=q_proj|v_proj]")
    for d2, d in zip(deltas2.values(), deltas.values()):
        d2.load_state_dict(d.state_dict())
    pmodel = peft.get_peft_model(_llama(), peft.AdaLoraConfig(init_r=4, target_r=2, target_modules=TARGETS,
                                                               total_step=10, orth_reg_weight=0.3))
    _copy_into_peft(pmodel, deltas)
    batch = tiny_batch(_llama(), batch=2, seq=6)
    labels = batch["input_ids"]
    with torch.no_grad():
        plain = pmodel.base_model.model(**batch, labels=labels).loss
        with_reg = pmodel.base_model(**batch, labels=labels).loss  # AdaLoraModel adds its orthogonality term
    assert float(pm2.regularizer()) == pytest.approx(float(with_reg - plain), rel=1e-4)
    assert float(peftlab.apply(_llama(), "adalora[orth_reg_weight=0]").regularizer()) == 0.0


# -- the budget -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields", [
    dict(init_r=12, target_r=8, total_step=100, tinit=10, tfinal=20, deltaT=1),
    dict(init_r=6, target_r=2, total_step=37, tinit=0, tfinal=5, deltaT=3),
    dict(init_r=4, target_r=1, total_step=9, tinit=3, tfinal=0, deltaT=2),
])
def test_budget_schedule_equals_peft_rank_allocator(fields):
    """Budget and masking decision at every step (and past the end) equal PEFT's RankAllocator for
    the same config on the same model."""
    _, pm, _ = _ours("adalora[" + ",".join(f"{k}={v}" for k, v in fields.items()) + ",targets=q_proj|v_proj]")
    pmodel = peft.get_peft_model(_llama(), peft.AdaLoraConfig(target_modules=TARGETS, **fields))
    alloc = pmodel.base_model.rankallocator
    hooks = _hooks(pm)
    assert (hooks.init_bgt, hooks.target_bgt) == (alloc.init_bgt, alloc.target_bgt)
    steps = range(0, fields["total_step"] + 4)
    assert [hooks.budget(t) for t in steps] == [alloc.budget_schedule(t) for t in steps]
    budgets = [hooks.budget(t)[0] for t in steps]
    assert budgets[0] == 4 * fields["init_r"] and budgets[-1] == 4 * fields["target_r"]
    assert all(a >= b for a, b in zip(budgets, budgets[1:])), "the budget never grows"


def test_masking_prunes_the_lowest_importance_triplets():
    """One on_step at a masking step, against a direct computation: I = |w·g|, Ī = (1−β1) I,
    Ū = (1−β2)|I − Ī|, s = Ī Ū, S_i = s(Λ_i) + mean s(Q_i·) + mean s(P_·i); the 16 − b lowest go,
    b = ⌊(16 − 8)(1 − 1/10)³ + 8⌋ = 13."""
    model, pm, deltas = _ours("adalora[init_r=4,target_r=2,total_step=10,beta1=0.7,beta2=0.6,targets=q_proj|v_proj]")
    randomize_adapter(pm, std=0.5)
    gen = torch.Generator().manual_seed(1)
    for d in deltas.values():
        for p in (d.lora_A, d.lora_E, d.lora_B):
            p.grad = torch.randn(p.shape, generator=gen)
    naive = []
    for name, d in deltas.items():
        for i in range(4):
            def s(w, g):
                I = (w * g).abs()
                ipt = 0.3 * I
                return ipt * 0.4 * (I - ipt).abs()
            score = float(s(d.lora_E[i, 0], d.lora_E.grad[i, 0]))
            score += float(s(d.lora_A[i], d.lora_A.grad[i]).mean())
            score += float(s(d.lora_B[:, i], d.lora_B.grad[:, i]).mean())
            naive.append((score, name, i))
    budget = int((16 - 8) * (1 - 1 / 10) ** 3 + 8)
    assert budget == 13
    kept = {(n, i) for _, n, i in sorted(naive, reverse=True)[:budget]}
    E_before = {n: d.lora_E.detach().clone() for n, d in deltas.items()}
    pm.on_step()
    assert _hooks(pm).last_budget == 13
    for name, d in deltas.items():
        assert d.rank_mask.tolist() == [(name, i) in kept for i in range(4)]
        torch.testing.assert_close(d.lora_E.detach(), E_before[name] * d.rank_mask.unsqueeze(1).float())
    assert sum(pm.report()["ranks"].values()) == 13
    assert pm.configs["default"].masks() == {n: d.rank_mask.tolist() for n, d in deltas.items()}


def _copy_into_peft(pmodel, deltas):
    with torch.no_grad():
        for name, d in deltas.items():
            layer = pmodel.base_model.model.get_submodule(name)
            for part in ("lora_A", "lora_E", "lora_B"):
                getattr(layer, part)["default"].copy_(getattr(d, part))


def test_training_masks_equal_peft_step_by_step():
    """The same weights, data and plain SGD steps in peftlab (pm.on_step) and in PEFT
    (update_and_allocate): the same masks after every step, the same pruned weights at the end."""
    fields = dict(init_r=5, target_r=2, total_step=12, tinit=2, tfinal=3, deltaT=1, beta1=0.8, beta2=0.7)
    model, pm, deltas = _ours("adalora[" + ",".join(f"{k}={v}" for k, v in fields.items()) + ",targets=q_proj|v_proj]")
    randomize_adapter(pm, std=0.2)
    pmodel = peft.get_peft_model(_llama(), peft.AdaLoraConfig(target_modules=TARGETS, **fields))
    _copy_into_peft(pmodel, deltas)
    batch = tiny_batch(model, batch=3, seq=8)
    target = torch.randn(3, 8, 128, generator=torch.Generator().manual_seed(2))
    ours_opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    peft_opt = torch.optim.SGD([p for p in pmodel.parameters() if p.requires_grad], lr=0.5)
    pm.train(), pmodel.train()
    pruned_at = []
    for step in range(1, 15):
        for net, opt in ((pm, ours_opt), (pmodel, peft_opt)):
            loss = F.mse_loss(first_output(net(**batch)), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        pm.on_step()
        pmodel.base_model.update_and_allocate(step)
        alloc = pmodel.base_model.rankallocator
        if step < 12 - 3:  # the smoothed sensitivity and uncertainty of every entry, too
            for name, parts in _hooks(pm).ema.items():
                for part, (ipt, unc) in parts.items():
                    key = f"{name}.{part}.default"
                    torch.testing.assert_close(ipt, alloc.exp_avg_ipt[key], atol=1e-9, rtol=1e-4)
                    torch.testing.assert_close(unc, alloc.exp_avg_unc[key], atol=1e-9, rtol=1e-4)
        pattern = pmodel.peft_config["default"].rank_pattern
        if pattern is not None:
            theirs = {k.rsplit(".lora_E", 1)[0]: v for k, v in pattern.items()}
            assert {n: d.rank_mask.tolist() for n, d in deltas.items()} == theirs, step
        pruned_at.append(sum(d.rank() for d in deltas.values()))
    assert pruned_at[0] == 20 and pruned_at[-1] == 4 * 2, pruned_at
    for name, d in deltas.items():
        layer = pmodel.base_model.model.get_submodule(name)
        torch.testing.assert_close(d.lora_E.detach(), layer.lora_E["default"].detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(d.lora_A.detach(), layer.lora_A["default"].detach(), atol=1e-5, rtol=1e-4)


def test_peftlab_trainer_reaches_the_target_budget():
    """peftlab's Trainer (loss + pm.regularizer(), pm.on_step()) on a tiny causal LM: afterwards the
    kept singular values are exactly target_r per module, report() ranks sum to it, the report's
    method string parses back to the adapter's config, and save/load keeps outputs and ranks."""
    model, pm, deltas = _ours("adalora[init_r=6,target_r=3,total_step=12,tinit=2,tfinal=2,alpha=12,"
                              "targets=q_proj|v_proj]")
    batch = tiny_batch(model, batch=4, seq=8)
    batch["labels"] = batch["input_ids"]
    reg0 = float(pm.regularizer())
    report = Trainer(pm, [batch] * 12, max_steps=12, lr=1e-2, progress=False, warmup_ratio=0.0).train()
    assert report["steps"] == 12 and _hooks(pm).step == 12
    assert sum(int(d.rank_mask.sum()) for d in deltas.values()) == 4 * 3
    rep = pm.report()
    assert sum(rep["ranks"].values()) == 12 and rep["ranks"] == {n: d.rank() for n, d in deltas.items()}
    again = peftlab.parse_method_string(rep["method"])
    assert again.to_dict() == pm.configs["default"].to_dict() and again.rank_pattern is not None
    assert float(pm.regularizer()) < reg0, "the orthogonality penalty was minimised"
    assert report["loss_curve"][-1] < report["loss_curve"][0]


def test_mixed_batch_with_pruned_adapters(monkeypatch):
    """Two adapters with different masks and init_r serve one batch row by row, gathered."""
    names = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in TARGETS]
    a = AdaLoraConfig(init_r=4, target_r=2, targets=TARGETS, rank_pattern=[f"{n}:1010" for n in names])
    b = AdaLoraConfig(init_r=3, target_r=2, alpha=5, targets=TARGETS, rank_pattern=[f"{n}:011" for n in names])
    assert_gathered_mixed_batch(monkeypatch, SvdLinear, _llama(), a, b, names=("a", "b", None, "a"),
                                batch=tiny_batch(_llama(), batch=4, seq=6))


def test_resume_from_saved_adapter_and_training_state(tmp_path):
    """Stopping after 5 of 12 steps, saving the adapter and pm.training_state(), and continuing on a
    fresh model gives the same masks and weights as an uninterrupted run (plain SGD: no optimizer state)."""
    cfg = "adalora[init_r=5,target_r=2,total_step=12,tinit=1,tfinal=3,targets=q_proj|v_proj]"
    batch = tiny_batch(_llama(), batch=3, seq=8)
    batch["labels"] = batch["input_ids"]

    def run(pm, steps):
        opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.3)
        pm.train()
        for _ in range(steps):
            (pm(**batch).loss + pm.regularizer()).backward()
            opt.step()
            pm.on_step()
            opt.zero_grad()

    torch.manual_seed(0)
    _, full, full_deltas = _ours(cfg)
    first = copy.deepcopy(full)
    run(full, 12)
    run(first, 5)
    first.save(tmp_path)
    state = first.training_state("default")
    resumed = peftlab.load(_llama(), tmp_path)
    resumed.load_training_state("default", state)
    run(resumed, 7)
    for name, d in full_deltas.items():
        r = dict((n, x) for _, n, x in resumed.placements["default"])[name]
        assert r.rank_mask.tolist() == d.rank_mask.tolist()
        torch.testing.assert_close(r.lora_E.detach(), d.lora_E.detach(), atol=1e-6, rtol=1e-5)


# -- files both ways with PEFT -------------------------------------------------------------------------
def _train_ours_pruned():
    model, pm, deltas = _ours("adalora[init_r=6,target_r=2,total_step=8,tinit=1,tfinal=2,alpha=10,"
                              "targets=q_proj|v_proj]")
    batch = tiny_batch(model, batch=3, seq=8)
    batch["labels"] = batch["input_ids"]
    Trainer(pm, [batch] * 8, max_steps=8, lr=2e-2, progress=False, warmup_ratio=0.0).train()
    return model, pm, deltas, batch


def test_our_pruned_adapter_loads_in_peft(tmp_path):
    model, pm, deltas, batch = _train_ours_pruned()
    assert sum(pm.report()["ranks"].values()) == 8
    pm.eval()
    pm.save(tmp_path)
    fields = json.loads((tmp_path / "adapter_config.json").read_text())
    assert fields["peft_type"] == "ADALORA" and fields["init_r"] == 6 and fields["total_step"] == 8
    kept = {k: sum(v) for k, v in fields["rank_pattern"].items()}
    assert kept == {f"{n}.lora_E": d.rank() for n, d in deltas.items()}
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    for n, d in deltas.items():
        assert tensors[f"base_model.model.{n}.lora_A"].shape == (d.rank(), 32)
        assert tensors[f"base_model.model.{n}.lora_E"].shape == (d.rank(), 1)
    theirs = peft.PeftModel.from_pretrained(_llama(), str(tmp_path))
    diff = (_out(theirs, batch) - _out(pm, batch)).abs().max().item()
    assert diff <= TOL, diff
    ours_again = peftlab.load(_llama(), tmp_path)
    assert (_out(ours_again, batch) - _out(pm, batch)).abs().max().item() <= 1e-6
    assert ours_again.report()["ranks"] == pm.report()["ranks"]


def test_peft_pruned_adapter_loads_in_peftlab(tmp_path):
    """PEFT trains with its RankAllocator to the end of the schedule, saves (rank_pattern, sliced
    tensors); peftlab loads it with PEFT's outputs and the pruned ranks."""
    fields = dict(init_r=6, target_r=2, total_step=8, tinit=1, tfinal=2, lora_alpha=10)
    pmodel = peft.get_peft_model(_llama(), peft.AdaLoraConfig(target_modules=TARGETS, **fields))
    batch = tiny_batch(_llama(), batch=3, seq=8)
    opt = torch.optim.AdamW([p for p in pmodel.parameters() if p.requires_grad], lr=2e-2)
    pmodel.train()
    for step in range(1, 9):
        pmodel(**batch, labels=batch["input_ids"]).loss.backward()
        opt.step()
        pmodel.base_model.update_and_allocate(step)
        opt.zero_grad()
    pmodel.save_pretrained(tmp_path)
    pattern = json.loads((tmp_path / "adapter_config.json").read_text())["rank_pattern"]
    assert sum(sum(v) for v in pattern.values()) == 8
    reference = _out(peft.PeftModel.from_pretrained(_llama(), str(tmp_path)), batch)
    ours = peftlab.load(_llama(), tmp_path)
    assert (_out(ours, batch) - reference).abs().max().item() <= TOL
    assert ours.report()["ranks"] == {k.rsplit(".lora_E", 1)[0]: sum(v) for k, v in pattern.items()}
    assert ours.configs["default"].init_r == 6 and ours.configs["default"].total_step == 8


@pytest.mark.parametrize("kind,target", [("llama", "q_proj"), ("gpt2", "c_attn"), ("bert", "query")])
def test_unpruned_files_both_ways(kind, target, tmp_path):
    """Random weights, no pruning: ours -> PEFT and PEFT -> ours, equal outputs and the same tensor
    keys (GPT-2's Conv1D: fan_in_fan_out). Without total_step ours still loads in PEFT."""
    batch = tiny_batch(tiny_model(kind), batch=2, seq=6)
    assert_same_and_adapted(ours_in_peft(lambda: tiny_model(kind), f"adalora[init_r=4,target_r=2,alpha=6,"
                                         f"targets={target}]", batch, tmp_path / "ours"))
    config = peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=6, target_modules=[target], total_step=10)
    assert_same_and_adapted(peft_in_ours(lambda: tiny_model(kind), config, batch, tmp_path / "peft"))
    assert sorted(load_file(tmp_path / "peft" / "adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "ours" / "adapter_model.safetensors"))


# -- wrong values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,field", [
    ("adalora[init_r=4,target_r=5]", "target_r"),
    ("adalora[init_r=0]", "init_r"),
    ("adalora[total_step=10,tinit=6,tfinal=4]", "tinit"),
    ("adalora[total_step=0]", "total_step"),
    ("adalora[deltaT=0]", "deltaT"),
    ("adalora[beta1=1]", "beta1"),
    ("adalora[beta2=0]", "beta2"),
    ("adalora[orth_reg_weight=-1]", "orth_reg_weight"),
    ("adalora[orth_reg=l1]", "orth_reg"),
    ("adalora[init_r=3,target_r=1,rank_pattern=x:1101]", "rank_pattern"),
])
def test_wrong_values_name_the_field(text, field):
    with pytest.raises(peftlab.ConfigError, match=field):
        peftlab.parse_method_string(text)


def test_missing_total_step_and_bad_rank_pattern_are_named():
    """total_step may stay unset to build, save and train without the budget; on_step needs it."""
    _, pm, _ = _ours("adalora[targets=q_proj]")
    with pytest.raises(peftlab.ConfigError, match="total_step"):
        pm.on_step()
    with pytest.raises(peftlab.ConfigError, match="rank_pattern"):
        peftlab.apply(_llama(), AdaLoraConfig(init_r=2, target_r=1, targets=["q_proj"], rank_pattern=["nowhere:11"]))
    fields = peft.AdaLoraConfig(total_step=10, target_modules=TARGETS).to_dict()
    assert config_from_peft({**fields, "rank_pattern": {"m.lora_E": [1, 0] * 6}}).masks() == {"m": [True, False] * 6}
    for bad in ({"lora_bias": True}, {"bias": "all"}, {"lora_alpha": 0}):
        with pytest.raises(peftlab.ConfigError, match=next(iter(bad))):
            config_from_peft({**fields, **bad})


def test_one_config_object_per_adapter():
    """Allocations record the masks in the adapter's config object, so two adapters may not share one."""
    cfg = AdaLoraConfig(init_r=4, target_r=2, targets=["q_proj"])
    pm = peftlab.apply(_llama(), cfg)
    with pytest.raises(ValueError, match="cfg.replace"):
        pm.add_adapter("b", cfg)
    assert pm.adapters == ["default"]
    pm.add_adapter("b", cfg.replace())
    pm.delete_adapter("default")
    pm.add_adapter("c", cfg)  # free again once its adapter is gone
