"""Methods that act during training (core/training.py), through DyLoRA: its rank sampling is the
per-step action, driven by ``pm.on_step()`` from a user's loop and from ``peftlab train``'s Trainer.
Also: adapters are in the mode (train/eval) of the module they are attached to."""

from __future__ import annotations

import pytest
import torch

import peftlab
from peftlab.methods.reparam.dylora import DyLoraLinear, set_eval_rank
from peftlab.train.trainer import Trainer
from peftlab.zoo import tiny_batch, tiny_model

from conftest import first_output, randomize_adapter


def _dylora(cfg: str = "dylora[r=8,r_min=2,alpha=16,targets=q_proj|v_proj]"):
    model = tiny_model("llama", task="causal-lm")
    pm = peftlab.apply(model, cfg)
    return model, pm, [d for _, _, d in pm.placements["default"]]


def test_truncated_forward_and_merge_match_the_formula():
    model, pm, deltas = _dylora()
    randomize_adapter(pm, std=0.2)
    d = deltas[0]
    x = torch.randn(3, 5, d.lora_A.weight.shape[1])
    A, B = d.lora_A.weight, d.lora_B.weight
    for b, training in ((3, True), (8, False)):
        d.train(training)
        d.train_rank = b
        expected = (16 / b) * x @ A[:b].T @ B[:, :b].T
        torch.testing.assert_close(d(x), expected, atol=1e-5, rtol=1e-5)
    set_eval_rank(pm, "default", 5)
    torch.testing.assert_close(d.delta_out_in(), (16 / 5) * B[:, :5] @ A[:5], atol=1e-6, rtol=1e-5)
    assert pm.report()["ranks"] == {n: 5 for _, n, _ in pm.placements["default"]}
    assert peftlab.parse_method_string(pm.report()["method"]).eval_rank == 5


def test_on_step_samples_reproducible_ranks_in_range():
    _, pm, deltas = _dylora()
    _, pm2, deltas2 = _dylora()
    seen = []
    for _ in range(40):
        pm.on_step()
        pm2.on_step()
        ranks = {d.train_rank for d in deltas}
        assert len(ranks) == 1, "one rank per step for the whole adapter"
        assert ranks == {d.train_rank for d in deltas2}, "the same seed gives the same ranks"
        seen.append(ranks.pop())
    assert min(seen) >= 2 and max(seen) <= 8 and len(set(seen)) >= 4
    assert pm.training_state("default")["step"] == 40
    _, pm3, deltas3 = _dylora()
    pm3.load_training_state("default", pm.training_state("default"))
    assert deltas3[0].train_rank == deltas[0].train_rank


def test_users_loop_and_peftlab_trainer_drive_the_protocol():
    model, pm, deltas = _dylora()
    batch = tiny_batch(model, batch=4, seq=8)
    batch["labels"] = batch["input_ids"]
    assert float(pm.regularizer()) == 0.0  # DyLoRA adds no loss term
    trainer = Trainer(pm, [batch] * 6, max_steps=6, lr=3e-3, progress=False, warmup_ratio=0.0)
    report = trainer.train()
    assert report["steps"] == 6
    assert pm.training_state("default")["step"] == 6  # the trainer called on_step once per step
    assert deltas[0].train_rank == trainer.peft._training["default"][0].sample_rank(6)


def test_every_rank_works_after_training():
    """Trained with rank sampling, each rank b <= r is a usable adapter: lower ranks track the full
    one, and the error shrinks as b grows (the nested structure DyLoRA trains for)."""
    torch.manual_seed(0)
    model, pm, deltas = _dylora("dylora[r=6,r_min=1,alpha=6,targets=q_proj|v_proj|o_proj]")
    batch = tiny_batch(model, batch=3, seq=8)
    teacher = peftlab.apply(tiny_model("llama", task="causal-lm"), "lora[r=6,alpha=6,targets=q_proj|v_proj|o_proj]")
    randomize_adapter(teacher, std=0.2)
    with torch.no_grad():
        target = first_output(teacher(**batch))
    pm.train()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(first_output(pm(**batch)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pm.on_step()
    pm.eval()
    errors = []
    for b in range(1, 7):
        set_eval_rank(pm, "default", b)
        with torch.no_grad():
            errors.append(torch.nn.functional.mse_loss(first_output(pm(**batch)), target).item())
    with torch.no_grad(), pm.disable_adapters():
        base_error = torch.nn.functional.mse_loss(first_output(pm(**batch)), target).item()
    assert all(e < base_error for e in errors), (errors, base_error)
    assert errors[-1] < errors[0], errors


def test_adapters_follow_the_mode_of_their_base():
    model, pm, deltas = _dylora()
    batch = tiny_batch(model, batch=2, seq=4)
    pm.train()
    model.eval()  # the user's own object
    with torch.no_grad():
        pm(**batch)
    assert not any(d.training for d in deltas)
    model.train()
    with torch.no_grad():
        pm(**batch)
    assert all(d.training for d in deltas)


def test_wrong_values_name_the_field():
    with pytest.raises(peftlab.ConfigError, match="r_min"):
        peftlab.parse_method_string("dylora[r=4,r_min=5]")
    with pytest.raises(peftlab.ConfigError, match="eval_rank"):
        peftlab.parse_method_string("dylora[r=4,eval_rank=0]")
    _, pm, _ = _dylora()
    with pytest.raises(ValueError, match=r"\[1, r=8\]"):
        set_eval_rank(pm, "default", 9)


def test_trainer_tells_schedules_the_run_length():
    """AdaLoRA without total_step takes the trainer's planned step count (begin_training), and its
    budget reaches target_r per module by the end."""
    model = tiny_model("llama", task="causal-lm")
    pm = peftlab.apply(model, "adalora[init_r=6,target_r=2,tinit=1,tfinal=2,deltaT=1,targets=q_proj|v_proj]")
    assert pm.configs["default"].total_step is None
    batch = tiny_batch(model, batch=4, seq=8)
    batch["labels"] = batch["input_ids"]
    Trainer(pm, [batch] * 8, max_steps=8, lr=1e-2, progress=False, warmup_ratio=0.0).train()
    assert pm.configs["default"].total_step == 8
    ranks = pm.report()["ranks"]
    assert len(ranks) == 4 and sum(ranks.values()) == 2 * 4
