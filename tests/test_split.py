"""Split training (``peftlab split serve|train``): a real server process runs the frozen model, the
client holds the data and the adapter; the adapter equals local training, the traffic is counted
as the server sees it, and what cannot be split is refused in one line."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from conftest import one_thread
from peftlab.cli import main
from peftlab.train.split.backbone import SplitError
from peftlab.train.split.client import SplitModel
from peftlab.train.split.connection import SplitConnection
from peftlab.train.split.process import server_process
from tiny_dirs import tiny_model_dir

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)
#: Every kind of site: LoRA (parallel, y not sent), IA3 on keys (output, reads y), IA3 on the FFN's
#: second projection (input site) and the classifier head copy (output, replaced).
METHOD = "lora[r=4,targets=query|value]+ia3[targets=key|layer.0.output.dense,feedforward=layer.0.output.dense]"
CALLS_PER_PASS = 8  # 4 LoRA + 2 IA3 keys + 1 IA3 input + 1 head
RUN = ["--task", "sst2", "--method", METHOD, "--train-limit", "48", "--eval-limit", "16", "--max-steps", "4",
       "--batch-size", "8", "--max-length", "12", "--lr", "2e-2", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("split"), "bert", "classification")


@pytest.fixture(scope="module")
def server(model_dir: Path):
    """``peftlab split serve`` in its own process, on a free port."""
    with server_process(str(model_dir), threads=1) as address:
        yield address


def _health(address: str) -> dict:
    with urllib.request.urlopen(f"http://{address}/health", timeout=30) as response:
        return json.loads(response.read())


def test_split_training_equals_local_training(server: str, model_dir: Path, tmp_path: Path) -> None:
    before = _health(server)
    split_run = ["split", "train", "--server", server, "--model", str(model_dir), *RUN, "--out", str(tmp_path / "split")]
    assert main(split_run) == 0
    after = _health(server)
    assert main(["train", "--model", str(model_dir), *RUN, "--out", str(tmp_path / "local")]) == 0
    split = load_file(str(tmp_path / "split" / "adapter_model.safetensors"))
    local = load_file(str(tmp_path / "local" / "adapter_model.safetensors"))
    assert split.keys() == local.keys() and len(split) == 13  # 8 LoRA, 3 IA3 vectors, the head
    for key in local:
        assert torch.allclose(split[key], local[key], rtol=0, atol=1e-6), key
    assert any(k.endswith("lora_B.weight") and split[k].abs().max() > 1e-3 for k in split)  # it trained
    split_report = json.loads((tmp_path / "split" / "report.json").read_text())
    local_report = json.loads((tmp_path / "local" / "report.json").read_text())
    assert split_report["loss_curve"] == pytest.approx(local_report["loss_curve"], abs=1e-6)
    assert split_report["metric_after"] == pytest.approx(local_report["metric_after"], abs=1e-9)
    # Every forward and every backward pass: one request to start it, one answer per adapted module.
    assert split_report["traffic_per_step"]["requests"] == 2 * (1 + CALLS_PER_PASS)
    # What the client counted is what the server received and sent, byte for byte.
    assert split_report["traffic"]["bytes_sent"] == after["bytes_in"] - before["bytes_in"]
    assert split_report["traffic"]["bytes_received"] == after["bytes_out"] - before["bytes_out"]


def test_a_client_with_another_model_is_refused(server: str) -> None:
    model = peftlab.zoo.tiny_model("llama", "classification")
    pm = peftlab.apply(model, "lora[r=2,targets=q_proj]")
    with pytest.raises(SplitError, match=r"has no module 'model.layers.0.self_attn.q_proj'.*same model"):
        SplitModel(pm, SplitConnection(server), "classification", 2)


@pytest.mark.parametrize(("args", "says"), [
    (["--server", "localhost"], "expected HOST:PORT"),
    (["--server", "127.0.0.1:1"], "cannot reach the split server at 127.0.0.1:1"),
    (["--server", "127.0.0.1:1", "--method", "prompt[length=4]"], "rewrites the model's inputs"),
    (["--server", "127.0.0.1:1", "--method", "adalora[init_r=4,target_r=2,total_step=4]"], "acts during training"),
])
def test_split_train_errors_are_one_line(args: list[str], says: str, model_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["split", "train", "--model", str(model_dir), "--task", "sst2", "--train-limit", "8", "--eval-limit", "8",
            "--out", str(tmp_path / "o"), *args]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("peftlab: error: ") and says in err and err.count("\n") == 1


def test_bench_split_writes_json_table_and_plot(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    methods = ["lora[r=4,targets=query|value]", "ia3"]
    argv = ["bench", "split", "--model", str(model_dir), "--steps", "2", "--batch-size", "4", "--max-length", "8",
            "--out", str(tmp_path), *[a for m in methods for a in ("--method", m)]]
    assert main(argv) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in result["rows"]] == methods
    for row in result["rows"]:
        split = row["split"]
        assert split["requests_per_step"] == 2 * (1 + split["adapted_modules"])
        assert split["bytes_sent_per_step"] > 0 and split["bytes_received_per_step"] > 0
        assert len(row["local"]["loss_curve"]) == len(split["loss_curve"]) == 2
        assert row["split_vs_local_time"] == pytest.approx(split["time_per_step_s"] / row["local"]["time_per_step_s"])
    table = capsys.readouterr().out
    assert all(m in table for m in methods) and "requests/step" in table
    assert (tmp_path / "split.png").stat().st_size > 0
