"""The ``peftlab`` command: user errors exit with status 2 and one line; ``info``; ``methods``; the
default learning rate from the registry (on a tiny model directory); the layering of the command
line (train and bench never import ``peftlab.cli``); and a real end-to-end training run on MiniLM."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import peftlab
from peftlab.cli import main
from peftlab.core.registry import get_method, list_methods
from peftlab.train.data import find_data_dir

ROOT = Path(__file__).resolve().parents[1]

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


def test_info_reads_our_config_beside_peft_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A directory saved today: PEFT's fields in adapter_config.json, ours in peftlab_config.json."""
    import peftlab
    from peftlab.zoo import tiny_model

    peftlab.apply(tiny_model("llama"), "lora[r=4,rslora=true]").save(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "rslora" in out and "peftlab_config.json" in out
    assert "lora_alpha" not in out  # PEFT's own field names are not what info shows


def test_info_with_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = {"model": "m", "task": "glue_rte", "method": "lora[r=2]", "trainable_params": 123456,
              "total_params": 1000000, "metric_names": ["accuracy"],
              "metrics_before": {"accuracy": 0.5, "loss": 0.7}, "metrics_after": {"accuracy": 0.75, "loss": 0.5},
              "peak_memory_bytes": 3 * 2**20, "peak_memory_method": "vmhwm"}
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "123,456" in out and "0.5000 -> 0.7500" in out and "3.0 MiB" in out


def test_entry_point_is_the_top_level_cli() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["peftlab"] == "peftlab.cli:main"


def test_methods_lists_every_registered_method() -> None:
    run = subprocess.run([sys.executable, "-m", "peftlab", "methods"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300, check=True)
    lines = run.stdout.strip().splitlines()
    assert lines[0].split()[:4] == ["name", "family", "sites", "merges"] and "default lr" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == list_methods()
    lora = next(line for line in lines if line.split()[0] == "lora")
    assert f"{get_method('lora').default_lr:g}" in lora and get_method("lora").example in lora


def test_methods_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in records] == list_methods()
    for r in records:
        spec = get_method(r["name"])
        assert r["default_lr"] == spec.default_lr and r["family"] == spec.family
        assert r["sites"] == list(spec.sites) and r["merges"] == spec.merges and r["per_row"] == spec.per_row
        assert r["peft_type"] == (spec.peft.peft_type if spec.peft else None) and r["example"] == spec.example


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module ``path`` (a module of ``package``) imports, anywhere in it, as absolute names;
    plus string constants naming peftlab modules (``importlib.import_module("...")``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("peftlab."):
            names.add(node.value)
    return names


@pytest.mark.parametrize("layer", ["train", "bench", "serve"])
def test_lower_layers_do_not_import_the_command_line(layer: str) -> None:
    files = sorted((ROOT / "peftlab" / layer).rglob("*.py"))
    assert files
    for path in files:
        package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
        bad = {n for n in _imported_modules(path, package) if n == "peftlab.cli" or n.startswith("peftlab.cli.")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


@pytest.mark.parametrize("method", ["bitfit", "houlsby[reduction_factor=8]+lora[r=2]"])
def test_train_without_lr_uses_the_method_default(method: str, tiny_run_args: list[str], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*tiny_run_args, "--method", method, "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "report.json").read_text())
    first = method.split("[")[0]
    assert report["lr"] == get_method(first).default_lr and report["lr_source"] == "method default"
    assert report["steps"] == 1


def test_train_with_lr_records_it(tiny_run_args: list[str], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*tiny_run_args, "--method", "lora[r=2]", "--lr", "0.0123", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["lr"] == 0.0123 and report["lr_source"] == "--lr"


@pytest.mark.real
@needs_data
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


# -- issue 8, item 7: help with defaults, --version, --device, task aliases, methods that do not apply ---

def test_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for shown in ("(default: lora[r=8])", "(default: 32)", "(default: 0.06)", "(default: auto)", "(default: 0)",
                  "(default: minilm)", "(default: the method's default_lr"):
        assert shown in text, shown
    assert "(default: None)" not in text and "(default: False)" not in text
    from peftlab.bench.cli import main as bench_main

    with pytest.raises(SystemExit):
        bench_main(["lora", "--help"])
    assert "(default: runs/bench_lora.json)" in " ".join(capsys.readouterr().out.split())


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"peftlab {peftlab.__version__}"


@pytest.mark.parametrize("device, says", [
    ("cuda", "CUDA is not available on this machine"),
    ("cuda:0", "CUDA is not available on this machine"),
    ("mps", "MPS backend is not available on this machine"),
    ("gpu", "not a device name; use auto, cpu, cuda, mps or cuda:N"),
    ("meta", "this command runs on auto, cpu, cuda, mps or cuda:N"),
])
def test_unavailable_or_unknown_device_is_one_line(device: str, says: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    # Checked before anything is loaded: the task's data need not exist.
    err = _fails_with(["train", "--task", "sst2", "--device", device, "--out", str(tmp_path)], capsys)
    assert says in err and err.startswith(f"peftlab: error: --device {device}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bench_refuses_a_missing_device_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "lora", "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftlab bench: error: --device cuda: CUDA is not available") and "\n" not in err


def test_task_aliases_name_the_registered_task() -> None:
    from peftlab.train.tasks import TASKS, get_task

    for alias, name in [("sst2", "glue_sst2"), ("SST-2", "glue_sst2"), ("glue_sst2", "glue_sst2"),
                        ("sts-b", "glue_stsb"), ("mnli", "glue_mnli_subset"), ("QQP", "glue_qqp_subset")]:
        assert get_task(alias).name == name
    for name in TASKS:
        assert get_task(name.removeprefix("glue_")).name == name


def test_unknown_task_alias_lists_the_task_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _fails_with(["train", "--task", "sst3", "--out", str(tmp_path), "--device", "cpu"], capsys)
    assert "unknown task 'sst3'" in err and all(name in err for name in ("glue_sst2", "glue_mnli_subset"))


@needs_data
def test_a_task_alias_loads_the_registered_task() -> None:
    """What ``peftlab train --task sst2`` loads (the report records the registered name)."""
    from peftlab.train.data import load_task

    assert load_task("sst2", "eval", limit=4).task == "glue_sst2"


def test_method_that_does_not_apply_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bitfit on a Llama (no biases): NotApplicableError, reported before the first evaluation."""
    from transformers import BertTokenizer

    from peftlab.zoo import tiny_model

    model_dir = tmp_path / "llama"
    tiny_model("llama").save_pretrained(model_dir)
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad"]) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(model_dir)
    data = tmp_path / "d.tsv"
    data.write_text("sentence\tlabel\n" + "\n".join(f"{w}\t{int(w == 'good')}" for w in ["good", "bad"] * 4) + "\n")
    capsys.readouterr()  # save_pretrained's progress bars
    with pytest.raises(SystemExit) as info:
        main(["train", "--model", str(model_dir), "--data", str(data), "--text-cols", "sentence",
              "--label-col", "label", "--method", "bitfit", "--device", "cpu", "--no-progress",
              "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()[-1]  # after transformers' own "Loading weights" bar
    assert "Traceback" not in stderr and err.startswith("peftlab: error: bitfit cannot be applied to "
                                                        "LlamaForSequenceClassification")
    assert not (tmp_path / "o").exists()
