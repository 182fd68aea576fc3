"""``peftlab train`` with several adapters: repeated ``--method``/``--task`` pairs and the run config's
``adapters`` list, one folder per adapter plus the joint report, each adapter equal to the same
``peftlab train`` run alone (dropout off), and the inputs a joint run refuses before loading anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from peftlab.cli import main


def _option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def _with(args: list[str], name: str, value: str) -> list[str]:
    """``args`` with option ``name`` set to ``value``."""
    i = args.index(name)
    return [*args[:i + 1], value, *args[i + 2:]]


@pytest.fixture(scope="module")
def regression_file(tiny_run_args: list[str]) -> Path:
    """A regression task beside the fixture's classification file: a score per sentence."""
    train = Path(_option(tiny_run_args, "--data"))
    rows = [line.split("\t") for line in train.read_text().splitlines()[1:]]
    path = train.with_name("scores.tsv")
    path.write_text("sentence\tscore\n" + "".join(f"{s}\t{int(y) * 2.5 + len(s) / 10:.2f}\n" for s, y in rows))
    return path


def test_adapters_list_in_run_config(tiny_run_args: list[str], regression_file: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    data = _option(tiny_run_args, "--data")
    config = tmp_path / "run.yaml"
    config.write_text(
        "max_steps: 2\nbatch_size: 8\nno_dropout: true\nlr: 0.01\n"
        "adapters:\n"
        f"  - {{name: pos, method: 'lora[r=2]', data: {data}, eval_data: {data}, text_cols: sentence,"
        " label_col: label}\n"
        f"  - {{name: score, method: ia3, data: {regression_file}, text_cols: sentence, label_col: score,"
        " max_steps: 3, batch_size: 4, lr: 0.05, eval_every: 2}\n")
    model = _option(tiny_run_args, "--model")
    out = tmp_path / "out"
    assert main(["train", "--model", model, "--config", str(config), "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "2 adapters over one" in printed and "pos" in printed and "score" in printed
    joint = json.loads((out / "report.json").read_text())
    assert list(joint["adapters"]) == ["pos", "score"] and joint["dropout"] == "off"
    # Passes of at most the largest batch (8): steps 1-2 hold 8 + 4 rows (2 passes), step 3 only 4.
    assert (joint["max_rows"], joint["micro_steps"], joint["forward_passes"]) == (8, 3, 5)
    assert (out / "loss_curves.png").stat().st_size > 1000
    pos, score = (json.loads((out / n / "report.json").read_text()) for n in ("pos", "score"))
    assert (pos["kind"], pos["steps"], pos["batch_size"], pos["lr"]) == ("classification", 2, 8, 0.01)
    assert (score["kind"], score["steps"], score["batch_size"], score["lr"]) == ("regression", 3, 4, 0.05)
    assert len(score["loss_curve"]) == 3 and score["metric"] == "pearson"
    assert [e["step"] for e in score["eval_history"]] == [2, 3] and [e["step"] for e in pos["eval_history"]] == [2]
    # Each folder holds its task's own head: 2 outputs for the classifier, 1 for the regression.
    assert load_file(str(out / "pos" / "adapter_model.safetensors"))["base_model.model.classifier.weight"].shape[0] == 2
    assert load_file(str(out / "score" / "adapter_model.safetensors"))["base_model.model.classifier.weight"].shape[0] == 1
    base, _ = peftlab.zoo.load(model, task="regression")
    loaded = peftlab.load(base, out / "score")
    assert loaded.report()["trainable_params"] == score["trainable_params"]
    assert main(["info", str(out / "score")]) == 0
    assert "pearson" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0  # the joint run's folder: its table again
    assert capsys.readouterr().out.splitlines()[:4] == printed.splitlines()[:4]
    # peftlab eval reads the folder onto a base made for its task alone and finds the joint run's metric.
    scores = tmp_path / "eval.json"
    assert main(["eval", str(out / "pos"), "--data", data, "--text-cols", "sentence", "--label-col", "label",
                 "--max-length", "8", "--device", "cpu", "--no-progress", "--json", str(scores)]) == 0
    evaluated = json.loads(scores.read_text())["metrics"]
    assert evaluated["accuracy"] == pytest.approx(pos["metric_after"])
    assert evaluated["loss"] == pytest.approx(pos["metrics_after"]["loss"], rel=1e-5)


def test_each_pair_equals_its_own_run(tiny_run_args: list[str], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """--method given twice with --data once: two adapters on the same data, each equal (files and
    loss curve) to peftlab train with that method alone, same seed, dropout off; also with gradient
    checkpointing (the backward pass re-runs the routed hooks)."""
    common = [*_with(tiny_run_args, "--max-steps", "3"), "--no-dropout", "--seed", "3"]
    alone_out = tmp_path / "alone"
    assert main([*common, "--method", "lora[r=4,alpha=8]", "--out", str(alone_out)]) == 0
    alone = load_file(str(alone_out / "adapter_model.safetensors"))
    alone_curve = torch.tensor(json.loads((alone_out / "report.json").read_text())["loss_curve"])
    for extra in ([], ["--gradient-checkpointing"]):
        joint_out = tmp_path / f"joint{len(extra)}"
        assert main([*common, *extra, "--method", "lora[r=2]", "--method", "lora[r=4,alpha=8]",
                     "--out", str(joint_out)]) == 0
        names = list(json.loads((joint_out / "report.json").read_text())["adapters"])
        assert names == ["train-lora", "train-lora-2"]
        mine = load_file(str(joint_out / names[1] / "adapter_model.safetensors"))
        assert mine.keys() == alone.keys()
        for key in alone:
            torch.testing.assert_close(mine[key], alone[key], rtol=1e-4, atol=1e-5)
        curve = json.loads((joint_out / names[1] / "report.json").read_text())["loss_curve"]
        torch.testing.assert_close(torch.tensor(curve), alone_curve, rtol=1e-5, atol=1e-6)
    capsys.readouterr()


SST2 = ["--task", "sst2"]


@pytest.mark.parametrize(("extra", "says"), [
    (["--method", "lora", "--method", "ia3", "--method", "bitfit", "--task", "sst2", "--task", "rte"],
     "--method is given 3 times and --task 2 times"),
    ([*SST2, "--method", "lora", "--method", "adalora"], "adalora acts during training"),
    ([*SST2, "--method", "lora", "--method", "qlora[r=4]"], "changes the base model"),
    ([*SST2, "--method", "prefix[length=4]", "--method", "prompt[length=4]"], "different model-level methods"),
    ([*SST2, "--method", "lora", "--method", "unipelt"], "does not batch per row"),
    ([*SST2, "--method", "lora", "--method", "ia3", "--max-rows-per-forward", "0"],
     "--max-rows-per-forward must be a number of rows >= 1 or all, got '0'"),
])
def test_refused_before_loading_anything(extra: list[str], says: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", str(tmp_path / "no-model"), *extra, "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftlab: error: ") and "\n" not in err and says in err, err


def test_unknown_key_of_an_adapter_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"adapters": [{"method": "lora", "task": "sst2"},
                                               {"method": "ia3", "task": "rte", "learning_rate": 0.1}]}))
    with pytest.raises(SystemExit):
        main(["train", "--config", str(config), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "adapters[1]: unknown key 'learning_rate'" in err and "lr" in err
