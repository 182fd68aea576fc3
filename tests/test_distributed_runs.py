"""``peftlab train`` in several real processes (gloo on CPU), started by the real launchers: torchrun
(DDP, and FSDP with --fsdp) and accelerate launch. Each gives the adapter that one process gives with
the same global batch (2 processes x 8 = 1 x 16), within float32 rounding: ATOL on every adapter
tensor after 8 steps (2 epochs, a new order each) with Adam at lr 0.01 on a tiny BERT without dropout.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from peftlab.cli import main
from tiny_dirs import WORDS, tiny_model_dir

ATOL = 1e-6  # observed: ~7e-8 (float32 sums in another order)
METHOD = "lora[r=4]"
BIN = Path(sys.executable).parent


def _rows(rng: random.Random, n: int) -> str:
    lines = ["sentence\tlabel"]
    for _ in range(n):
        ws = [rng.choice(WORDS) for _ in range(rng.randint(1, 5))]
        good = sum(w in ("good", "fine") for w in ws) > sum(w in ("bad", "awful") for w in ws)
        lines.append(f"{' '.join(ws)}\t{int(good)}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny BERT directory (dropout 0) with a word tokenizer, 64 training rows (4 global batches of
    16) and 33 eval rows (17 + 16 over two processes: one process has a batch fewer)."""
    root = tmp_path_factory.mktemp("dist")
    bert = tiny_model_dir(root, "bert", "classification")
    rng = random.Random(0)
    (root / "train.tsv").write_text(_rows(rng, 64))
    (root / "eval.tsv").write_text(_rows(rng, 33))
    args = ["--model", str(bert), "--data", str(root / "train.tsv"), "--eval-data", str(root / "eval.tsv"),
            "--text-cols", "sentence", "--label-col", "label", "--max-length", "12", "--method", METHOD,
            "--lr", "0.01", "--epochs", "2", "--seed", "5", "--no-progress", "--device", "cpu"]
    return {"root": root, "args": args, "bert": bert}


def _launch(launcher: list[str], setup: dict[str, Any], out: Path, *extra: str,
            args: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(setup["root"] / "hf")}  # no user accelerate config
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(name, None)
    command = [*launcher, "-m", "peftlab", "train", *(args or [*setup["args"], "--batch-size", "8"]), "--out", str(out),
               *extra]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def _torchrun() -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def reference(setup: dict[str, Any]) -> Path:
    """One process, global batch 16, evaluated every 2 steps."""
    out = setup["root"] / "one"
    assert main(["train", *setup["args"], "--batch-size", "16", "--eval-every", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def ddp_run(setup: dict[str, Any]) -> tuple[Path, str]:
    out = setup["root"] / "ddp"
    return out, _launch(_torchrun(), setup, out, "--eval-every", "2").stdout


def _report(out: Path) -> dict[str, Any]:
    return json.loads((out / "report.json").read_text())


def _assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys() and len(ta) == 10  # 8 LoRA factors, the head's weight and bias
    for key in ta:
        assert torch.allclose(ta[key], tb[key], rtol=0, atol=ATOL), (key, float((ta[key] - tb[key]).abs().max()))


def _assert_same_training(one: dict[str, Any], many: dict[str, Any]) -> None:
    assert many["steps"] == one["steps"] == 8
    assert many["examples"] == one["examples"] == 128  # 2 epochs of 64, counted over both processes
    assert many["loss_curve"] == pytest.approx(one["loss_curve"], rel=1e-6)
    assert many["grad_norm_curve"] == pytest.approx(one["grad_norm_curve"], rel=1e-5)
    after_one, after_many = one["metrics_after"], many["metrics_after"]
    assert after_many["examples"] == after_one["examples"] == 33  # every eval example once, gathered
    assert after_many["accuracy"] == after_one["accuracy"]
    assert after_many["predicted_class_counts"] == after_one["predicted_class_counts"]
    assert after_many["loss"] == pytest.approx(after_one["loss"], rel=1e-6)


def test_torchrun_ddp_trains_the_adapter_one_process_trains(setup: dict[str, Any], reference: Path,
                                                            ddp_run: tuple[Path, str]) -> None:
    out, stdout = ddp_run
    _assert_same_adapter(reference, out)
    one, many = _report(reference), _report(out)
    _assert_same_training(one, many)
    assert [h["step"] for h in many["eval_history"]] == [2, 4, 6, 8]
    for h1, h2 in zip(one["eval_history"], many["eval_history"], strict=True):
        assert h2["examples"] == 33 and h2["loss"] == pytest.approx(h1["loss"], rel=1e-6)
    assert many["metrics_before"]["examples"] == 33
    assert many["metrics_before"]["loss"] == pytest.approx(one["metrics_before"]["loss"], rel=1e-6)
    # DDP's reducer holds the trainable parameters and nothing of the frozen base.
    pm = peftlab.apply(peftlab.zoo.load(str(setup["bert"]), task="classification")[0], METHOD,
                       modules_to_save=["classifier"])
    trainable = [p for p in pm.parameters() if p.requires_grad]
    procs = many["processes"]
    assert (procs["world_size"], procs["strategy"], procs["backend"], procs["global_batch"]) == (2, "ddp", "gloo", 16)
    assert procs["ddp_reduced_tensors"] == len(trainable) == 10
    assert procs["ddp_reduced_bytes"] == 4 * many["trainable_params"] == 4 * sum(p.numel() for p in trainable)
    assert procs["broadcast_changed_adapter"] is False  # the same --seed gave every process the same init
    # Process 0 alone writes: one log line per step and evaluation, one table, one checkpoint series.
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 9))
    assert stdout.count("peftlab train ->") == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == sorted(
        p.name for p in (reference / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def fsdp_run(setup: dict[str, Any]) -> tuple[Path, str]:
    out = setup["root"] / "fsdp"
    return out, _launch(_torchrun(), setup, out, "--fsdp").stdout


def test_torchrun_fsdp_trains_the_adapter_one_process_trains(reference: Path, fsdp_run: tuple[Path, str]) -> None:
    out = fsdp_run[0]
    _assert_same_adapter(reference, out)
    many = _report(out)
    _assert_same_training(_report(reference), many)
    procs = many["processes"]
    assert (procs["world_size"], procs["strategy"], procs["fsdp_units"]) == (2, "fsdp", 3)  # 2 blocks + root
    assert many["trainable_params"] == _report(reference)["trainable_params"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("mode", ["--multi_gpu", "--use_fsdp"])
def test_accelerate_launch_gives_the_torchrun_adapter(mode: str, setup: dict[str, Any], request: pytest.FixtureRequest,
                                                      ) -> None:
    # accelerate 1.x starts several processes through torchrun with --multi_gpu or --use_fsdp (on CPU
    # too); its --cpu flag runs one process (its multi-CPU launcher is mpirun). --use_fsdp turns on
    # peftlab's --fsdp (and its default RAM-efficient loading is turned off: every process loads).
    torchrun_out = request.getfixturevalue("fsdp_run" if mode == "--use_fsdp" else "ddp_run")[0]
    out = setup["root"] / f"accelerate{mode}"
    launcher = [str(BIN / "accelerate"), "launch", mode, "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    _launch(launcher, setup, out, *(["--eval-every", "2"] if mode == "--multi_gpu" else []))
    _assert_same_adapter(torchrun_out, out)
    many = _report(out)
    assert many["processes"]["world_size"] == 2
    assert many["processes"]["strategy"] == ("fsdp" if mode == "--use_fsdp" else "ddp")
    assert many["loss_curve"] == pytest.approx(_report(torchrun_out)["loss_curve"], rel=1e-6)


def test_torchrun_ddp_instruction_tuning_equals_one_process(setup: dict[str, Any]) -> None:
    # Causal-LM: loss on the response tokens, and an eval set scored by generation, which every
    # process evaluates whole (DDP's wrapper has no generate(): the trainer evaluates the module).
    root = setup["root"]
    model = tiny_model_dir(root, "llama", "causal-lm")
    rows = [("good movie", "good movie"), ("bad plot", "bad plot"), ("one two", "one two"), ("the movie", "the movie")]
    (root / "copy.csv").write_text("source,target\n" + "".join(f"{a},{b}\n" for a, b in rows * 4))
    args = ["--model", str(model), "--data", str(root / "copy.csv"), "--eval-data", str(root / "copy.csv"),
            "--prompt-col", "source", "--response-col", "target", "--answer-regex", r"(\w+)",
            "--method", "lora[r=4,targets=all-linear]", "--lr", "0.02", "--max-steps", "4", "--max-length", "16",
            "--no-progress", "--device", "cpu"]
    assert main(["train", *args, "--batch-size", "8", "--out", str(root / "lm-one")]) == 0
    _launch(_torchrun(), setup, root / "lm-ddp", args=[*args, "--batch-size", "4"])
    ta = load_file(str(root / "lm-one" / "adapter_model.safetensors"))
    tb = load_file(str(root / "lm-ddp" / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys() and len(ta) == 28  # A and B of the 14 linear layers of 2 blocks
    assert all(torch.allclose(ta[k], tb[k], rtol=0, atol=ATOL * 10) for k in ta)  # lr 0.02: observed 8e-7
    one, many = _report(root / "lm-one"), _report(root / "lm-ddp")
    assert many["loss_curve"] == pytest.approx(one["loss_curve"], rel=1e-6)
    for key in ("loss", "exact_match", "examples"):
        assert many["metrics_after"][key] == pytest.approx(one["metrics_after"][key], rel=1e-6)
    assert many["metrics_after"]["examples"] == 16 and many["processes"]["strategy"] == "ddp"
