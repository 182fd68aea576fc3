"""The run mechanics of ``peftlab train``: run configs in YAML and JSON (command-line flags win;
unknown keys and wrong types named), lr schedules, gradient accumulation, gradient checkpointing,
bf16 where the device has it, early stopping, the JSONL log (TensorBoard when installed) and the
progress bar."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import peftlab
from peftlab.cli import main
from peftlab.core.model_calls import checkpointing_enabled
from peftlab.train.cli import add_train_arguments
from peftlab.train.checkpoint import CheckpointError
from peftlab.train.early_stopping import EarlyStopping
from peftlab.train.run_log import TENSORBOARD_MISSING, read_log
from peftlab.train.runconfig import config_actions
from peftlab.train.schedules import SCHEDULES, make_scheduler, schedule_function
from peftlab.train.trainer import Trainer
from peftlab.zoo import tiny_batch, tiny_model


from conftest import cli_error, one_thread

_one_thread = pytest.fixture(autouse=True)(one_thread)


def _as_config(argv: list[str]) -> dict[str, object]:
    """``--key value`` / ``--flag`` pairs of a command line as run-config keys."""
    out: dict[str, object] = {}
    items = argv[1:] if argv[:1] == ["train"] else argv
    i = 0
    while i < len(items):
        key = items[i].removeprefix("--").replace("-", "_")
        if i + 1 < len(items) and not items[i + 1].startswith("--"):
            out[key], i = items[i + 1], i + 2
        else:
            out[key], i = True, i + 1
    return out


# -- run configs --------------------------------------------------------------------------------------

def test_config_keys_are_the_parsers_options() -> None:
    keys = set(config_actions(add_train_arguments))
    assert {"max_steps", "lr", "lr_scheduler", "save_every", "bf16", "out", "no_progress"} <= keys
    assert {"no_header", "prompt_col", "response_col"} <= keys  # added by the task-kinds options: no second list
    assert not keys & {"help", "config", "resume"}


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_a_run_config_trains_and_command_line_flags_win(fmt: str, tiny_run_args: list[str], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    config = {**_as_config(tiny_run_args), "max_steps": 9, "lr_scheduler": "cosine", "warmup_steps": 1,
              "lr": "1e-2", "method": "lora[r=2]", "out": str(tmp_path / "run")}
    config["max-length"] = config.pop("max_length")  # the option's own spelling is read too
    path = tmp_path / f"run.{fmt}"
    path.write_text(yaml.safe_dump(config) if fmt == "yaml" else json.dumps(config))
    assert main(["train", "--config", str(path), "--max-steps", "4"]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 4 and report["lr"] == 0.01 and report["lr_scheduler"] == "cosine"
    # cosine after one warmup step: 1, then ½(1 + cos(π·k/3)) for k = 0, 1, 2
    assert report["lr_curve"] == pytest.approx([0.01, 0.01, 0.0075, 0.0025])
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert saved["max_steps"] == 4 and saved["lr_scheduler"] == "cosine" and saved["max_length"] == 8


def test_unknown_key_is_named_with_a_suggestion_and_the_valid_keys(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("task: sst2\nmax_step: 10\n")
    err = cli_error(["train", "--config", str(path)], capsys)
    assert f"run config {path}: unknown key 'max_step' (did you mean 'max_steps'?); valid keys: " in err
    assert "lr_scheduler" in err and "no_header" in err and "prompt_col" in err


@pytest.mark.parametrize("text, says", [
    ("max_steps: ten", "max_steps must be an integer, got 'ten' (a string)"),
    ("max_steps: 2.5", "max_steps must be an integer, got 2.5 (a number)"),
    ("lr: [1, 2]", "lr must be a number, got [1, 2] (a list)"),
    ("no_progress: maybe", "no_progress must be true or false, got 'maybe' (a string)"),
    ("lr_scheduler: step", "lr_scheduler must be one of linear, cosine, constant, constant_with_warmup, got 'step'"),
    ("model: {r: 8}", "model must be a string, got {'r': 8} (a mapping)"),
    ("epochs: null", "epochs must be an integer, got None (null)"),
    ("- max_steps: 1", "must be a mapping of option: value (e.g. max_steps: 100), not a list"),
    ("max_steps: [1\n", "is not valid YAML: "),
])
def test_a_wrong_value_names_the_key_and_the_type(text: str, says: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    err = cli_error(["train", "--config", str(path), "--out", str(tmp_path / "o")], capsys)
    assert says in err, err
    assert not (tmp_path / "o").exists()


def test_config_file_problems(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run.toml").write_text("x = 1")
    assert "unknown format '.toml'; use .yaml, .yml or .json" in cli_error(
        ["train", "--config", str(tmp_path / "run.toml")], capsys)
    assert f"run config {tmp_path / 'nope.yaml'} not found" in cli_error(
        ["train", "--config", str(tmp_path / "nope.yaml")], capsys)
    (tmp_path / "bad.json").write_text('{"max_steps": 1,}')
    assert "is not valid JSON: Expecting property name enclosed in double quotes (line 1, column 17)" in cli_error(
        ["train", "--config", str(tmp_path / "bad.json")], capsys)
    (tmp_path / "empty.yaml").write_text("task: sst2\n")
    assert "give --out DIR (or out: DIR in the --config file)" in cli_error(
        ["train", "--config", str(tmp_path / "empty.yaml")], capsys)


# -- schedules, accumulation ------------------------------------------------------------------------------

def test_schedules_by_hand() -> None:
    values = {name: [schedule_function(name)(s, 2, 6) for s in range(6)] for name in SCHEDULES}
    assert values["linear"] == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert values["cosine"] == pytest.approx([0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)])
    assert values["constant"] == [1.0] * 6
    assert values["constant_with_warmup"] == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="unknown lr schedule 'step'; choose one of linear, cosine"):
        schedule_function("step")
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = make_scheduler(optimizer, "constant_with_warmup", 4, 10)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])


def _regression_batches(n: int, rows: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(rows, 4, generator=generator)
        out.append({"x": x, "labels": x @ torch.tensor([1.0, -2.0, 0.5, 3.0])})
    return out


class Linear(nn.Module):
    """A regression model without dropout, so that updates compare exactly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.proj(x).squeeze(-1)
        return {"loss": nn.functional.mse_loss(out, labels), "logits": out}


def test_gradient_accumulation_equals_the_big_batch() -> None:
    """Two batches of 4 accumulated give the update of one batch of 8 (mean of equal-size means)."""
    small = _regression_batches(8, 4)
    big = [{k: torch.cat([a[k], b[k]]) for k in a} for a, b in zip(small[::2], small[1::2])]
    accumulated, whole = Linear(), Linear()
    Trainer(accumulated, small, lr=0.05, max_steps=4, grad_accum=2, warmup_ratio=0.0, progress=False).train()
    Trainer(whole, big, lr=0.05, max_steps=4, warmup_ratio=0.0, progress=False).train()
    assert not torch.equal(whole.proj.weight, Linear().proj.weight)
    torch.testing.assert_close(accumulated.proj.weight, whole.proj.weight, atol=1e-6, rtol=1e-6)


# -- gradient checkpointing, bf16 -------------------------------------------------------------------------

def _bert_lora():
    model = tiny_model("bert", task="classification")
    torch.manual_seed(0)
    pm = peftlab.apply(model, "lora[r=4,dropout=0.1]", modules_to_save=["classifier"])
    batch = tiny_batch(model, batch=4, seq=8)
    batch["labels"] = torch.tensor([0, 1, 1, 0])
    return model, pm, [batch] * 3


def test_gradient_checkpointing_recomputes_and_gives_the_same_training() -> None:
    runs = {}
    for on in (False, True):
        model, pm, batches = _bert_lora()
        calls = []
        model.bert.encoder.layer[0].attention.self.query.register_forward_hook(lambda *a: calls.append(1))
        report = Trainer(pm, batches, max_steps=3, lr=1e-2, progress=False, gradient_checkpointing=on).train()
        assert checkpointing_enabled(model) is on and report["gradient_checkpointing"] is on
        runs[on] = (report["loss_curve"], len(calls))
    # the first layer's query runs twice per step with checkpointing: forward, then again in the backward pass
    assert runs[False][1] == 3 and runs[True][1] == 6
    assert runs[True][0] == pytest.approx(runs[False][0], abs=1e-6)  # dropout masks are replayed too
    with pytest.raises(ValueError, match="gradient checkpointing: Linear does not support it"):
        Trainer(Linear(), _regression_batches(1, 4), max_steps=1, progress=False, gradient_checkpointing=True)


def test_bf16_is_refused_where_the_device_lacks_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bf16 requested, but device cpu has no bf16 training here"):
        Trainer(Linear(), _regression_batches(1, 4), max_steps=1, progress=False, bf16=True)
    # before anything is loaded: the task's data need not exist
    err = cli_error(["train", "--task", "sst2", "--device", "cpu", "--bf16", "--out", str(tmp_path)], capsys)
    assert err.startswith("peftlab: error: --bf16: device cpu has no bf16 training here") and "CUDA" in err
    assert Trainer(Linear(), _regression_batches(1, 4), max_steps=1, progress=False, bf16=False).mixed_precision is False


@pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()), reason="needs a bf16 GPU")
def test_bf16_trains_on_a_gpu_that_has_it() -> None:
    _, pm, batches = _bert_lora()
    report = Trainer(pm, batches, max_steps=3, lr=1e-2, progress=False, device="cuda", bf16=True).train()
    assert report["mixed_precision"] == "bf16" and all(math.isfinite(x) for x in report["loss_curve"])


# -- early stopping, the log, the progress bar ----------------------------------------------------------------

def test_early_stopping_by_hand() -> None:
    higher = EarlyStopping("accuracy", patience=2)
    assert [higher.update(s, {"accuracy": a}) for s, a in [(1, 0.5), (2, 0.6), (3, 0.6), (4, 0.7), (5, 0.65),
                                                            (6, float("nan"))]] == [False] * 5 + [True]
    assert (higher.best, higher.best_step) == (0.7, 4)
    lower = EarlyStopping("loss", patience=1)
    assert [lower.update(s, {"loss": v}) for s, v in [(1, 2.0), (2, 1.5), (3, 1.5)]] == [False, False, True]
    with pytest.raises(ValueError, match="watches 'f1', which the evaluation does not give; it gives loss, accuracy"):
        EarlyStopping("f1", 1).update(1, {"loss": 1.0, "accuracy": 0.5, "examples": 3})


def test_trainer_stops_early_and_a_resume_stays_stopped(tmp_path: Path) -> None:
    """With a learning rate too small to change anything, the eval loss never improves after the
    first evaluation: patience 2 stops the run at the third evaluation."""
    batches = _regression_batches(4, 4)
    report = Trainer(Linear(), batches, batches, lr=1e-30, max_steps=100, eval_every=2, warmup_ratio=0.0,
                     early_stopping_patience=2, early_stopping_metric="loss", checkpoint_dir=tmp_path,
                     progress=False).train()
    assert report["steps"] == 6 and [h["step"] for h in report["eval_history"]] == [2, 4, 6, 6]
    assert report["early_stopping"] == {"metric": "loss", "best": report["eval_history"][0]["loss"], "best_step": 2,
                                        "bad_evaluations": 2, "stopped": True, "patience": 2}
    again = Trainer(Linear(), batches, batches, lr=1e-30, max_steps=100, eval_every=2, warmup_ratio=0.0,
                    early_stopping_patience=2, early_stopping_metric="loss", checkpoint_dir=tmp_path,
                    progress=False, resume_from=tmp_path / "final").train()
    assert again["steps"] == 6 and again["eval_history"] == report["eval_history"]
    with pytest.raises(ValueError, match="early stopping needs evaluations: give eval_every"):
        Trainer(Linear(), batches, batches, max_steps=4, early_stopping_patience=2, progress=False)


def test_log_jsonl_holds_every_step_and_evaluation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, pm, batches = _bert_lora()
    report = Trainer(pm, batches, batches[:1], max_steps=6, lr=1e-2, eval_every=3, log_dir=tmp_path,
                     lr_scheduler="constant", progress=False).train()
    records = read_log(tmp_path / "log.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in evals] == [3, 6]
    assert [r["loss"] for r in steps] == report["loss_curve"] and [r["lr"] for r in steps] == [1e-2] * 6
    assert [r["grad_norm"] for r in steps] == report["grad_norm_curve"] and all(r["grad_norm"] > 0 for r in steps)
    assert all(r["tokens_per_s"] > 0 and r["examples_per_s"] > 0 for r in steps)
    assert [r["eval_loss"] for r in evals] == [h["loss"] for h in report["eval_history"]]
    assert [r["eval_accuracy"] for r in evals] == [h["accuracy"] for h in report["eval_history"]]
    err = capsys.readouterr().err
    if importlib.util.find_spec("tensorboard") is None:
        # said once for the run (8 records were written), and not an error
        assert err.count(TENSORBOARD_MISSING) == 1 and report["log_note"] == TENSORBOARD_MISSING
        assert not (tmp_path / "tensorboard").exists()
    else:
        assert report["log_note"] is None and any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_progress_bar_counts_steps_and_starts_at_the_resumed_step(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    batches = _regression_batches(2, 4)
    Trainer(Linear(), batches, max_steps=4, save_every=2, checkpoint_dir=tmp_path, progress=True).train()
    err = capsys.readouterr().err
    assert "train: 100%" in err and "4/4" in err and "loss=" in err
    Trainer(Linear(), batches, max_steps=4, checkpoint_dir=tmp_path, progress=True,
            resume_from=tmp_path / "step-2").train()
    err = capsys.readouterr().err
    assert "2/4" in err and "1/4" not in err and "4/4" in err


def test_early_stopping_options_are_checked_before_training(tiny_run_args: list[str], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    err = cli_error([*tiny_run_args, "--early-stopping-patience", "2", "--out", str(tmp_path / "a")], capsys)
    assert "--early-stopping-patience needs evaluations during training: give --eval-every N" in err
    err = cli_error([*tiny_run_args, "--eval-every", "1", "--early-stopping-patience", "2",
                     "--early-stopping-metric", "auc", "--out", str(tmp_path / "b")], capsys)
    assert "--early-stopping-metric auc: the evaluation gives no such number; it gives loss, accuracy" in err
    assert not (tmp_path / "b" / "log.jsonl").exists()  # refused before the first step


def test_resuming_another_run_is_refused(tmp_path: Path) -> None:
    batches = _regression_batches(2, 4)
    Trainer(Linear(), batches, max_steps=4, save_every=2, checkpoint_dir=tmp_path, progress=False).train()
    with pytest.raises(CheckpointError, match=r"other settings; resuming would not continue the same run: "
                                              r"grad_accum=2 \(saved: 1\)"):
        Trainer(Linear(), batches, max_steps=4, grad_accum=2, checkpoint_dir=tmp_path, progress=False,
                resume_from=tmp_path / "step-2").train()
    with pytest.raises(CheckpointError, match=r"holds tensors this model lacks \(proj.bias, proj.weight\): it was "
                                              "written for another model or method"):
        Trainer(nn.Sequential(nn.Linear(4, 1)), batches, max_steps=4, checkpoint_dir=tmp_path, progress=False,
                resume_from=tmp_path / "step-2").train()
