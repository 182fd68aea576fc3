"""Several adapters trained over one frozen base in shared mixed batches (``peftlab.train.multi``).

The key property: with dropout off, each adapter of a joint run ends as it ends when trained alone
with the same seed, data, batch size and settings — loss curve, weights (also as saved and loaded
onto a base made for its task alone) and eval metrics — whatever the other adapters' methods, ranks,
tasks (classification and regression heads of different widths), batch sizes, step counts and
gradient accumulation, and whether a joint micro-step is one forward pass or several.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch

import peftlab
from peftlab.train.data import find_data_dir, load_task, make_loader
from peftlab.train.dropout import disable_dropout
from peftlab.train.examples import Examples
from peftlab.train.heads import head_module_names
from peftlab.train.multi_run import prepare_joint_run, train_jointly
from peftlab.train.multi_setup import AdapterRun
from peftlab.train.trainer import Trainer
from peftlab.zoo.seeding import seeded

pytestmark = [pytest.mark.real, pytest.mark.skipif(find_data_dir() is None, reason="shared/data not found")]

LR = 5e-3
#: LoRA r8 on SST-2, LoRA r16 on RTE (batch 3, two micro-batches per step), (IA)³ on STS-B (regression).
SPECS = [
    ("sst2", "lora[r=8,targets=query|value]", 4, {"max_steps": 3}),
    ("rte", "lora[r=16,targets=query|value]", 3, {"max_steps": 2, "grad_accum": 2}),
    ("stsb", "ia3", 5, {"max_steps": 4}),
]


@functools.cache
def _examples(task: str) -> tuple[Examples, Examples]:
    return load_task(task, "train", limit=24, seed=0), load_task(task, "eval", limit=8, seed=0)


def _runs() -> list[AdapterRun]:
    runs = []
    for seed, (task, method, batch, trainer) in enumerate(SPECS, start=1):
        train, evals = _examples(task)
        runs.append(AdapterRun(name=task, method=method, train=train, eval=evals, lr=LR, batch_size=batch,
                               max_length=32, seed=seed, trainer={"warmup_ratio": 0.25, **trainer}, task_name=task))
    return runs


def _alone(run: AdapterRun) -> dict[str, Any]:
    """``run`` trained on its own: a base made for its task, the adapter under seeded(seed), the
    single-adapter Trainer (what peftlab train does), dropout off."""
    model, tokenizer = peftlab.zoo.load("minilm", task=run.train.kind, num_labels=run.width)
    disable_dropout(model)
    with seeded(run.seed):
        pm = peftlab.apply(model, run.method, modules_to_save=head_module_names(model))
    trainer = Trainer(pm, make_loader(run.train, tokenizer, run.batch_size, run.max_length, shuffle=True, seed=run.seed),
                      make_loader(run.eval, tokenizer, run.batch_size, run.max_length),
                      optimizer_groups=peftlab.param_groups(pm, lr=run.lr), lr=run.lr, progress=False, seed=run.seed,
                      **run.trainer)
    init = {k: v.clone() for k, v in pm.adapter_tensors("default").items()}
    result = trainer.train()
    return {"result": result, "tensors": pm.adapter_tensors("default"), "init": init, "pm": pm}


@pytest.fixture(scope="module")
def alone() -> dict[str, dict[str, Any]]:
    torch.set_num_threads(1)
    return {run.name: _alone(run) for run in _runs()}


@pytest.mark.parametrize("max_rows", [None, 5])
def test_each_adapter_ends_as_if_trained_alone(max_rows: int | None, alone: dict[str, dict[str, Any]],
                                               tmp_path: Path) -> None:
    runs = _runs()
    joint = prepare_joint_run("minilm", runs, "cpu", no_dropout=True)
    report = train_jointly(joint, tmp_path, max_rows=max_rows, progress=False, plot=False)
    assert report["micro_steps"] == 4  # RTE's 2 steps x 2 micro-batches, STS-B's 4 steps
    # Rows per micro-step: 12, 12, 12, then 8 (SST-2 done): 3 + 3 + 3 + 2 passes of at most 5 rows.
    assert report["forward_passes"] == (4 if max_rows is None else 11)
    for run in runs:
        ref = alone[run.name]
        mine = report["adapters"][run.name]
        assert mine["steps"] == ref["result"]["steps"] == run.trainer["max_steps"]
        torch.testing.assert_close(torch.tensor(mine["loss_curve"]), torch.tensor(ref["result"]["loss_curve"]),
                                   rtol=1e-5, atol=1e-6)
        # The saved adapter, loaded onto a base made for this task alone, holds the alone run's weights.
        pm = peftlab.load(ref["pm"], tmp_path / run.name, adapter_name=f"joint{max_rows}")
        saved = pm.adapter_tensors(f"joint{max_rows}")
        assert saved.keys() == ref["tensors"].keys()
        moved = max(float((ref["tensors"][k] - ref["init"][k]).abs().max()) for k in saved)
        gap = max(float((saved[k] - ref["tensors"][k]).abs().max()) for k in saved)
        assert moved > 50 * gap and gap < 2e-4, (run.name, moved, gap)
        assert mine["metric_after"] == pytest.approx(ref["result"]["eval"][run.train.metrics[0]], abs=1e-5)
