"""Issue 11, task kinds and data as users have them: headerless GLUE TSVs (--no-header, column
numbers; the registered glue_cola task), reports beside their no-skill baseline (a model that
collapses to the majority class is flagged), regression's mean-prediction baseline, and bad input
(missing columns, labels outside the task's, empty files, content of another format than the
extension, prompts longer than the model's context), each one line with exit status 2 or a
counted, reported truncation. Tiny random models saved to directories; a few seconds each."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from peftlab.cli import main
from peftlab.train.baselines import baseline_check, constant_baseline
from peftlab.train.data import load_file, load_task
from peftlab.train.examples import DataError, Examples
from conftest import cli_error, one_thread
from tiny_dirs import WORDS, tiny_model_dir

#: Four lines of GLUE's own CoLA train.tsv layout: source, label, original label (blank), sentence.
COLA_LINES = [
    "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
    "gj04\t1\t\tOne more pseudo generalization and I'm giving up.",
    "gj04\t0\t*\tThey drank the pub.",
    "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.",
]


_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


QUICK = ["--max-steps", "1", "--batch-size", "8", "--max-length", "16", "--no-progress", "--device", "cpu"]


# -- headerless files ---------------------------------------------------------------------------

def test_headerless_cola_tsv_by_column_number(tmp_path: Path) -> None:
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(COLA_LINES) + "\n")
    ex = load_file(path, ["3"], "1", header=False)
    assert ex.texts[0] == ("Our friends won't buy this analysis, let alone the next one we propose.",)
    assert ex.texts[2] == ("They drank the pub.",) and ex.labels == [1, 1, 0, 1] and ex.label_names == ["0", "1"]
    assert ex.source == str(path) and len(ex) == 4  # the first line is data, not a header
    # Without --no-header: the message, now with the way out.
    with pytest.raises(DataError, match=r"no column '3'; columns are: gj04, 1, , Our friends .*use --no-header"):
        load_file(path, ["3"], "1")
    with pytest.raises(DataError, match=r"no column '5'; columns are 0\.\.3 \(no header; first row 0='gj04', 1='1'"):
        load_file(path, ["5"], "1", header=False)
    (tmp_path / "d.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(DataError, match="--no-header applies to .csv and .tsv"):
        load_file(tmp_path / "d.jsonl", ["0"], "1", header=False)


def test_registered_cola_reads_glue_headerless_files_with_matthews(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "glue_cola"
    folder.mkdir()
    (folder / "train.tsv").write_text("\n".join(COLA_LINES) + "\n")
    (folder / "dev.tsv").write_text("\n".join(COLA_LINES[:3]) + "\ngj04\t2\t\tA bad label.\n")
    monkeypatch.setenv("PEFTLAB_DATA", str(tmp_path))
    train = load_task("cola", "train")
    assert train.task == "glue_cola" and train.metrics == ["mcc", "accuracy"]
    assert train.labels == [1, 1, 0, 1] and train.label_names == ["unacceptable", "acceptable"]
    with pytest.raises(DataError, match=r"dev\.tsv:4: label 2 outside 0\.\.1"):  # the line, 1-based, headerless
        load_task("cola", "eval")


# -- reports that cannot flatter ------------------------------------------------------------------

def test_baselines_by_hand() -> None:
    ex = Examples(texts=[("x",)] * 10, labels=[1] * 7 + [0] * 3, label_names=["no", "yes"], kind="classification",
                  metrics=["accuracy", "mcc", "f1"])
    base = constant_baseline(ex)
    assert base["kind"] == "majority class" and base["prediction"] == "yes" and base["share"] == 0.7
    assert base["metrics"] == pytest.approx({"accuracy": 0.7, "mcc": 0.0, "f1": 2 * 7 / (2 * 7 + 3)})
    reg = Examples(texts=[("x",)] * 4, labels=[1.0, 2.0, 3.0, 6.0], label_names=[], kind="regression",
                   metrics=["pearson", "spearman"])
    mean = constant_baseline(reg)
    assert mean["prediction"] == 3.0 and mean["metrics"] == pytest.approx({"pearson": 0, "spearman": 0, "mse": 3.5})
    check = baseline_check("accuracy", {"accuracy": 0.7, "predicted_class_counts": [0, 10]}, base, ex.label_names)
    assert not check["beats_baseline"] and "does not beat the majority class baseline 0.7000" in check["warning"]
    assert "predicts 'yes' for every eval example" in check["warning"]
    assert baseline_check("accuracy", {"accuracy": 0.8, "predicted_class_counts": [2, 8]}, base,
                          ex.label_names) == {"metric": "accuracy", "value": 0.8, "baseline": 0.7,
                                              "beats_baseline": True, "warning": None}
    assert baseline_check("pearson", {"pearson": float("nan"), "prediction_std": 0.0}, mean, [])["warning"] == (
        "pearson undefined does not beat the mean prediction baseline 0.0000; "
        "the model predicts the same value for every eval example")


def test_collapse_to_the_majority_class_is_flagged(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """CoLA-style data, 69% acceptable, where every sentence is the same: the model can only learn the
    prior, so it answers "acceptable" for everything. Its accuracy is 0.69, as the issue's run was; the
    report must say that this is the majority-class baseline and that Matthews correlation is 0."""
    model = tiny_model_dir(tmp_path, "bert", "classification")
    rows = [f"src\t{int(i < 69)}\t\tthe movie was good" for i in range(100)]
    random.Random(0).shuffle(rows)
    data = tmp_path / "cola.tsv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--model", str(model), "--data", str(data), "--eval-data", str(data), "--no-header",
                 "--text-cols", "3", "--label-col", "1", "--metrics", "accuracy,mcc", "--method", "lora[r=2]",
                 "--lr", "0.05", "--out", str(out), *QUICK, "--max-steps", "15", "--batch-size", "50"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["no_header"] is True and report["metric"] == "accuracy"
    assert report["baseline"]["kind"] == "majority class" and report["baseline"]["prediction"] == "1"
    assert report["baseline"]["metrics"] == pytest.approx({"accuracy": 0.69, "mcc": 0.0})
    assert report["metrics_after"]["predicted_class_counts"] == [0, 100]
    assert report["metric_after"] == pytest.approx(0.69) and report["metrics_after"]["mcc"] == 0.0
    assert report["baseline_check"]["beats_baseline"] is False
    assert "WARNING" in printed and "predicts '1' for every eval example" in printed
    assert "0.6900 (majority class baseline 0.6900)" in printed


def test_regression_reports_pearson_beside_the_mean_baseline(tmp_path: Path) -> None:
    model = tiny_model_dir(tmp_path, "bert", "regression")
    rng = random.Random(1)
    lines = [f"{rng.choice(WORDS)} {rng.choice(WORDS)},{rng.uniform(0, 5):.2f}" for _ in range(40)]
    data = tmp_path / "sts.csv"
    data.write_text("sentence,score\n" + "\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert main(["train", "--model", str(model), "--data", str(data), "--eval-data", str(data), "--text-cols",
                 "sentence", "--label-col", "score", "--method", "lora[r=2]", "--out", str(out), *QUICK]) == 0
    report = json.loads((out / "report.json").read_text())
    labels = np.array([float(line.split(",")[1]) for line in lines])
    assert report["kind"] == "regression" and report["metric_names"] == ["pearson", "spearman"]
    assert report["baseline"]["kind"] == "mean prediction"
    assert report["baseline"]["prediction"] == pytest.approx(labels.mean())
    assert report["baseline"]["metrics"]["mse"] == pytest.approx(labels.var())
    # The model's own eval loss is its MSE: the number to hold against the baseline's.
    assert report["metrics_after"]["prediction_std"] > 0 and math.isfinite(report["metrics_after"]["loss"])


# -- bad input: one line, exit status 2 ------------------------------------------------------------

@pytest.mark.parametrize("name, content, says", [
    ("empty.csv", "\n\n", "is empty"),
    ("json.csv", '{"sentence": "a", "label": 1}\n', "the file holds JSON, not CSV"),
    ("rows.jsonl", "sentence,label\na,1\n", "not JSON: the first line starts with 'sentence,label'"),
    ("commas.tsv", "sentence,label\na,1\n", "no tab in the first line but commas: this looks like CSV"),
])
def test_files_of_the_wrong_format_or_empty(name: str, content: str, says: str, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / name
    path.write_text(content)
    err = cli_error(["train", "--data", str(path), "--text-cols", "sentence", "--label-col", "label",
                       "--out", str(tmp_path / "o"), "--device", "cpu"], capsys)
    assert str(path) in err and says in err


def test_eval_label_outside_the_train_labels_names_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, dev = tmp_path / "train.tsv", tmp_path / "dev.tsv"
    train.write_text("sentence\tlabel\ngood\tpos\nbad\tneg\n")
    dev.write_text("sentence\tlabel\ngood\tpos\nfine\tmaybe\n")
    err = cli_error(["train", "--data", str(train), "--eval-data", str(dev), "--text-cols", "sentence",
                       "--label-col", "label", "--out", str(tmp_path / "o"), "--device", "cpu"], capsys)
    assert f"{dev}:3: label 'maybe' is not one of neg, pos" in err


def test_prompt_response_missing_columns_lists_the_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "one", "answer": "two"}\n' * 4)
    model = tiny_model_dir(tmp_path, "llama", "causal-lm")
    err = cli_error(["train", "--model", str(model), "--data", str(path), "--prompt-col", "prompt",
                       "--response-col", "answer", "--out", str(tmp_path / "o"), "--device", "cpu"], capsys)
    assert "no column 'prompt'; columns are: question, answer" in err
    err = cli_error(["train", "--model", "minilm", "--data", str(path), "--prompt-col", "question",
                       "--response-col", "answer", "--out", str(tmp_path / "o"), "--device", "cpu"], capsys)
    assert "minilm is an encoder (BERT) and cannot generate" in err


def test_prompts_longer_than_the_context_are_counted_or_refused(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The tiny Llama has 64 positions. --max-length 512 is capped to them: a prompt that leaves no room
    for its answer is left out, a response that overruns is cut, and the report counts both; when
    every prompt is too long the run stops before loading anything else, with a clear line."""
    model = tiny_model_dir(tmp_path, "llama", "causal-lm")
    long_prompt = " ".join(["the movie"] * 40)  # 80 words, past 64 tokens with the plain format's words
    rows = ([{"q": "one two", "a": "good"}] * 6 + [{"q": "one", "a": " ".join(["bad"] * 100)}] * 3
            + [{"q": long_prompt, "a": "fine"}] * 2)
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["train", "--model", str(model), "--data", str(data), "--eval-data", str(data), "--prompt-col", "q",
                 "--response-col", "a", "--method", "lora[r=2]", "--out", str(out), *QUICK,
                 "--max-length", "512"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "causal-lm" and report["prompt_format"] == "plain"
    assert report["lengths"]["train"] == {"examples": 9, "truncated": 3, "dropped": 2, "limit": 64}
    assert "9 kept, 3 truncated, 2 dropped (limit 64 tokens)" in printed
    data.write_text(json.dumps({"q": long_prompt, "a": "fine"}) + "\n")
    err = cli_error(["train", "--model", str(model), "--data", str(data), "--eval-data", str(data), "--prompt-col",
                       "q", "--response-col", "a", "--out", str(tmp_path / "o2"), *QUICK, "--max-length", "512"],
                     capsys)
    assert "every one of the 1 prompts is longer than the 64-token limit (--max-length 512, model context 64)" in err


def test_run_config_reads_headerless_files(tmp_path: Path) -> None:
    """The run config key of the same name: ``no_header: true`` with column numbers."""
    model = tiny_model_dir(tmp_path, "bert", "classification")
    data = tmp_path / "cola.tsv"
    data.write_text("\n".join(COLA_LINES * 4) + "\n")
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"model": str(model), "data": str(data), "no_header": True, "text_cols": "3",
                                  "label_col": "1", "metrics": "mcc,accuracy", "method": "lora[r=2]",
                                  "out": str(tmp_path / "run")}))
    assert main(["train", "--config", str(config), *QUICK]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["no_header"] is True and report["metric"] == "mcc" and report["train_examples"] == 14
    assert report["baseline"]["metrics"] == {"mcc": 0.0, "accuracy": 1.0}  # the 2 held-out lines: both acceptable
