"""The ``peftlab`` command: user errors exit with status 2 and one line; ``info``; and (once the zoo
and apply exist) a real end-to-end training run on MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import peftlab
from peftlab.train.cli import main
from peftlab.train.data import find_data_dir

needs_data = pytest.mark.skipif(find_data_dir() is None, reason="benchmark data (shared/data) not found")


def _fails_with(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftlab: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_unknown_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fails_with(["train", "--task", "glue_nope", "--out", str(tmp_path)], capsys)
    assert "unknown task 'glue_nope'" in err and "glue_sst2" in err


def test_missing_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.csv"
    err = _fails_with(["train", "--data", str(missing), "--text-cols", "t", "--label-col", "y",
                       "--out", str(tmp_path / "o")], capsys)
    assert str(missing) in err


def test_unknown_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "d.tsv"
    path.write_text("sentence\tlabel\na\t1\nb\t0\n")
    err = _fails_with(["train", "--data", str(path), "--text-cols", "text", "--label-col", "label",
                       "--out", str(tmp_path / "o")], capsys)
    assert "no column 'text'; columns are: sentence, label" in err


def test_data_without_columns_and_no_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "--text-cols" in _fails_with(["train", "--data", "x.csv", "--out", str(tmp_path)], capsys)
    assert "--task" in _fails_with(["train", "--out", str(tmp_path)], capsys)


def test_info_without_report_reads_adapter_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fails_with(["info", str(tmp_path / "missing")], capsys)
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "peftlab": {"method": "lora", "r": 4, "targets": ["query"]}}))
    save_file({"a": torch.zeros(4, 8), "b": torch.zeros(3)}, str(tmp_path / "adapter_model.safetensors"))
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "stored params" in out and "35" in out  # 4*8 + 3
    assert "lora" in out and "adapter_model.safetensors" in out


def test_info_with_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = {"model": "m", "task": "glue_rte", "method": "lora[r=2]", "trainable_params": 123456,
              "total_params": 1000000, "metric_names": ["accuracy"],
              "metrics_before": {"accuracy": 0.5, "loss": 0.7}, "metrics_after": {"accuracy": 0.75, "loss": 0.5},
              "peak_memory_bytes": 3 * 2**20, "peak_memory_method": "vmhwm"}
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "123,456" in out and "0.5000 -> 0.7500" in out and "3.0 MiB" in out


@pytest.mark.real
@needs_data
@pytest.mark.skipif(not (hasattr(peftlab, "apply") and hasattr(getattr(peftlab, "zoo", None), "load")),
                    reason="peftlab.apply / peftlab.zoo.load not written yet")
def test_train_minilm_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code = main(["train", "--model", "minilm", "--task", "glue_sst2", "--method", "lora[r=8]",
                 "--max-steps", "30", "--train-limit", "512", "--eval-limit", "200",
                 "--out", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    for key in ("metric_before", "metric_after"):
        assert 0.0 <= report[key] <= 1.0
    assert report["metrics_before"]["examples"] == report["metrics_after"]["examples"] == 200
    assert report["steps"] == 30 and len(report["loss_curve"]) == 30
    assert 0 < report["trainable_params"] < report["total_params"]
    assert report["peak_memory_bytes"] > 0 and report["wall_time_s"] > 0
    assert report["versions"]["torch"] == torch.__version__
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert f"{report['trainable_params']:,}" in capsys.readouterr().out
