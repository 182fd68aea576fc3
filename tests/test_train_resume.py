"""Checkpoints that resume exactly: a real ``peftlab train`` process killed with SIGKILL and resumed
gives the same loss curve and adapter as an uninterrupted run; damaged checkpoints are refused and
the previous good one is used; the data order, random generators and AdaLoRA's rank budget resume
exactly; checkpoints are written atomically and pruned to the newest K."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import peftlab
from peftlab.cli import main
from peftlab.train.checkpoint import (
    CheckpointError,
    choose_checkpoint,
    prune_checkpoints,
    verify_checkpoint,
    write_checkpoint,
)
from peftlab.train.data import find_data_dir
from peftlab.train.data_order import BatchStream
from peftlab.train.run_log import RunLog, read_log
from peftlab.train.trainer import Trainer
from peftlab.zoo import tiny_batch, tiny_model

from conftest import cli_error

ROOT = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(find_data_dir() is None, reason="benchmark data (shared/data) not found")

#: 32 SST-2 rows, 32 tokens, batches of 8: 4 steps an epoch, 8 steps, a checkpoint every 2.
MINILM_RUN = ["train", "--model", "minilm", "--task", "sst2", "--train-limit", "32", "--eval-limit", "16",
              "--max-length", "32", "--batch-size", "8", "--max-steps", "8", "--save-every", "2",
              "--eval-every", "4", "--no-progress", "--device", "cpu"]


def _peftlab(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "peftlab", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _curve(out: Path) -> list[tuple]:
    """(step, loss, lr, grad norm, eval loss, eval accuracy) of every log line: the numbers, not the timings."""
    return [(r["step"], r.get("loss"), r.get("lr"), r.get("grad_norm"), r.get("eval_loss"), r.get("eval_accuracy"))
            for r in read_log(out / "log.jsonl")]


@pytest.mark.real
@needs_data
def test_a_killed_run_resumes_with_the_same_loss_curve_and_adapter(tmp_path: Path) -> None:
    """SIGKILL a real training process between checkpoints, resume it, compare with a run that was
    never interrupted: the loss curve, evaluations and adapter weights are bit-identical (CPU, one
    thread, same seed: every operation is deterministic)."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = _peftlab([*MINILM_RUN, "--out", str(whole)])
    victim = _peftlab([*MINILM_RUN, "--out", str(killed)])
    deadline = time.monotonic() + 240
    # Kill after step 3: step-2 is on disk, step 3 was taken and must be taken again.
    while not any(r["step"] >= 3 for r in (read_log(killed / "log.jsonl") if (killed / "log.jsonl").exists() else [])):
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run never reached step 3"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed / "report.json").exists() and not (killed / "checkpoints" / "final").exists()
    newest, _ = choose_checkpoint(killed / "checkpoints")
    steps_logged = max(r["step"] for r in read_log(killed / "log.jsonl"))
    # What the kill lost: the steps after the newest checkpoint, never more.
    assert newest is not None and steps_logged - 2 < int(newest.name.removeprefix("step-")) <= steps_logged

    resumed = _peftlab(["train", "--resume", str(killed)])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resuming from {newest}" in err
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]

    assert _curve(killed) == _curve(whole) and len(_curve(whole)) == 8 + 2  # 8 steps, 2 evaluations
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (whole, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (whole, killed))
    assert ra["loss_curve"] == rb["loss_curve"] and ra["metrics_after"]["loss"] == rb["metrics_after"]["loss"]
    assert rb["resumed_at_step"] == int(newest.name.removeprefix("step-")) and ra["resumed_from"] is None


# -- damaged checkpoints, through the command line on a tiny BERT -----------------------------------

def _break(folder: Path, how: str) -> str:
    """Damage checkpoint ``folder``; returns what the refusal must say."""
    target = folder / "trainer_state" / "tensors.safetensors"
    if how == "flipped":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
        return "sha256 differs from the manifest"
    if how == "truncated":
        target.write_bytes(target.read_bytes()[:100])
        return "has 100 bytes, the manifest says"
    if how == "missing":
        target.unlink()
        return "trainer_state/tensors.safetensors is missing"
    (folder / "manifest.json").unlink()
    return "manifest.json is missing"


@pytest.fixture(scope="module")
def cut_run(tiny_run_args: list[str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A whole 6-step run on the tiny BERT, and the folder a run of it killed after step 5 leaves
    (the kill itself: the test above): checkpoints step-2 and step-4, no final one, no report."""
    root = tmp_path_factory.mktemp("cut")
    run = [*tiny_run_args, "--max-steps", "6", "--save-every", "2", "--method", "lora[r=2]"]
    assert main([*run, "--out", str(root / "whole")]) == 0
    assert main([*run, "--out", str(root / "cut")]) == 0
    (root / "cut" / "report.json").unlink()
    shutil.rmtree(root / "cut" / "checkpoints" / "final")
    return root / "whole", root / "cut"


@pytest.mark.parametrize("how", ["flipped", "truncated", "missing", "no manifest"])
def test_a_damaged_checkpoint_is_refused_and_the_previous_one_used(how: str, cut_run: tuple[Path, Path],
                                                                    tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    whole, cut = cut_run[0], tmp_path / "cut"
    shutil.copytree(cut_run[1], cut)
    checkpoints = cut / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-2", "step-4"]
    says = _break(checkpoints / "step-4", how)
    capsys.readouterr()
    assert main(["train", "--resume", str(cut)]) == 0
    err = capsys.readouterr().err
    assert f"checkpoint {checkpoints / 'step-4'} refused: " in err and says in err
    assert f"resuming from {checkpoints / 'step-2'} (step 2)" in err
    assert _curve(cut) == _curve(whole)
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (whole, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_a_good_checkpoint_or_with_other_options_is_one_line(
        tiny_run_args: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main([*tiny_run_args, "--method", "lora[r=2]", "--save-every", "1", "--max-steps", "2",
                 "--out", str(out)]) == 0
    for folder in (out / "checkpoints").iterdir():
        (folder / "manifest.json").unlink()
    capsys.readouterr()
    err = cli_error(["train", "--resume", str(out)], capsys)
    assert err.startswith(f"peftlab: error: --resume {out}: no usable checkpoint") and "manifest.json is missing" in err
    err = cli_error(["train", "--resume", str(out), "--lr", "0.5", "--no-progress"], capsys)
    assert "these options differ from it: lr=0.5 (the run has None)" in err and "no_progress" not in err
    assert "no run_config.json there" in cli_error(["train", "--resume", str(tmp_path / "nowhere")], capsys)


def test_a_new_run_into_an_unfinished_runs_folder_is_refused(tiny_run_args: list[str], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main([*tiny_run_args, "--method", "lora[r=2]", "--save-every", "1", "--max-steps", "2",
                 "--out", str(out)]) == 0
    assert main([*tiny_run_args, "--method", "lora[r=2]", "--save-every", "1", "--max-steps", "2",
                 "--out", str(out)]) == 0  # a finished run's checkpoints are replaced
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["final", "step-1"]
    shutil.rmtree(out / "checkpoints" / "final")
    capsys.readouterr()
    err = cli_error([*tiny_run_args, "--method", "lora[r=2]", "--out", str(out)], capsys)
    assert f"holds checkpoints of an unfinished run (step-1); continue it with --resume {out}" in err


# -- AdaLoRA's rank budget, the data order, the log, the checkpoint folder ----------------------------

ADALORA = "adalora[init_r=6,target_r=2,tinit=1,tfinal=2,deltaT=1,dropout=0.1,targets=q_proj|v_proj]"


def _hooked_run(tmp: Path, method: str = ADALORA, resume_from: Path | None = None, init_seed: int = 0):
    model = tiny_model("llama", task="causal-lm")
    torch.manual_seed(init_seed)
    pm = peftlab.apply(model, method)
    batches = []
    for i in range(4):
        b = tiny_batch(model, batch=4, seq=8, seed=i)
        batches.append({**b, "labels": b["input_ids"]})
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    trainer = Trainer(pm, loader, max_steps=10, lr=1e-2, progress=False, warmup_ratio=0.0, checkpoint_dir=tmp,
                      save_every=4, save_fn=pm.save, resume_from=resume_from)
    return pm, trainer.train()


def test_adalora_rank_budget_resumes_exactly(tmp_path: Path) -> None:
    """AdaLoRA masks triplets by their importance (running averages of |w·grad|) on a schedule: a
    run resumed at step 4 from a fresh model, whose adapter was initialised differently, ends with
    the same masks, the same statistics and the same weights as the uninterrupted run."""
    pm_a, a = _hooked_run(tmp_path / "a")
    pm_b, b = _hooked_run(tmp_path / "b", resume_from=tmp_path / "a" / "step-4", init_seed=1)
    assert b["resumed_at_step"] == 4 and b["loss_curve"] == a["loss_curve"]
    assert pm_b.report()["ranks"] == pm_a.report()["ranks"] and sum(pm_a.report()["ranks"].values()) == 2 * 4
    sa, sb = pm_a.training_state("default"), pm_b.training_state("default")
    assert sa["step"] == sb["step"] == 10
    ha, hb = sa["hooks"][0], sb["hooks"][0]
    assert ha["last_budget"] == hb["last_budget"]
    assert all(torch.equal(ha["masks"][n], hb["masks"][n]) for n in ha["masks"])
    pa = {n: p for n, p in pm_a.named_parameters() if p.requires_grad}
    pb = {n: p for n, p in pm_b.named_parameters() if p.requires_grad}
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


def test_dylora_rank_sampling_resumes_exactly(tmp_path: Path) -> None:
    """DyLoRA trains a rank drawn from (seed, step) at each step: the resumed run draws the ranks
    of the uninterrupted one, so its losses and weights are the same."""
    method = "dylora[r=6,r_min=1,alpha=6,targets=q_proj|v_proj]"
    pm_a, a = _hooked_run(tmp_path / "a", method)
    pm_b, b = _hooked_run(tmp_path / "b", method, resume_from=tmp_path / "a" / "step-4", init_seed=1)
    assert b["loss_curve"] == a["loss_curve"] and pm_b.training_state("default") == pm_a.training_state("default")
    deltas = [d for _, _, d in pm_b.placements["default"]]
    assert {d.train_rank for d in deltas} == {d.train_rank for _, _, d in pm_a.placements["default"]}
    pa, pb = dict(pm_a.named_parameters()), dict(pm_b.named_parameters())
    assert all(torch.equal(pa[n], pb[n]) for n in pa if pa[n].requires_grad)


@pytest.mark.parametrize("source", ["own generator", "global generator", "list"])
@pytest.mark.parametrize("stop_after", [1, 2, 3])
def test_batch_stream_seeks_to_the_same_order(source: str, stop_after: int) -> None:
    """Groups of 2 over 5 batches an epoch (groups of 2, 2, 1): a stream rebuilt from a position,
    in any epoch and across an epoch's end, gives the same next groups as the original."""
    rows = [{"x": torch.tensor([i])} for i in range(10)]

    def loader():
        if source == "list":
            return [{"x": torch.tensor([i, i])} for i in range(5)]
        generator = torch.Generator().manual_seed(3) if source == "own generator" else None
        return torch.utils.data.DataLoader(rows, batch_size=2, shuffle=True, generator=generator)

    torch.manual_seed(0)
    stream = BatchStream(loader(), 2)
    for _ in range(stop_after + 3):  # into the second epoch
        stream.next_group()
    position = stream.position()
    expected = [[b["x"].tolist() for b in stream.next_group()] for _ in range(7)]
    torch.manual_seed(123)  # a new process: another global state
    again = BatchStream(loader(), 2)
    again.seek(position)
    assert [[b["x"].tolist() for b in again.next_group()] for _ in range(7)] == expected


def test_run_log_keeps_the_steps_up_to_the_checkpoint(tmp_path: Path) -> None:
    with RunLog(tmp_path, warn=False) as log:
        for step in range(1, 6):
            log.write({"step": step, "loss": float(step), "lr": float("nan")})
    with (tmp_path / "log.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # the line a kill cut short
    with RunLog(tmp_path, resume_step=3, warn=False) as log:
        log.write({"step": 4, "loss": 40.0})
    records = read_log(tmp_path / "log.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
    assert records[0]["lr"] is None  # NaN is written as null: the file stays strict JSON
    with RunLog(tmp_path, warn=False):
        pass
    assert read_log(tmp_path / "log.jsonl") == []  # a new run starts a new log


def test_checkpoints_are_written_atomically_verified_and_pruned(tmp_path: Path) -> None:
    def fill(folder: Path) -> None:
        (folder / "trainer_state").mkdir()
        for name in ("progress.json", "tensors.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "hooks.pt"):
            (folder / "trainer_state" / name).write_text(name)

    for step in (2, 4, 6):
        write_checkpoint(tmp_path, f"step-{step}", step, fill)
    assert verify_checkpoint(tmp_path / "step-6")["step"] == 6

    def crash(folder: Path) -> None:
        fill(folder)
        raise KeyboardInterrupt  # killed while writing

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, "step-8", 8, crash)
    assert not (tmp_path / "step-8").exists()  # only the temporary folder holds the half-written files
    assert choose_checkpoint(tmp_path) == (tmp_path / "step-6", [])
    (tmp_path / "step-6" / "trainer_state" / "rng.pt").write_text("rng.PT")  # same size, other bytes
    folder, refusals = choose_checkpoint(tmp_path)
    assert folder == tmp_path / "step-4" and refusals == [
        f"checkpoint {tmp_path / 'step-6'} refused: trainer_state/rng.pt: its sha256 differs from the manifest "
        "(the bytes changed)"]
    assert prune_checkpoints(tmp_path, keep=2) == [tmp_path / "step-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4", "step-6"]  # and no temporary folder
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointError, match="not a peftlab-checkpoint/1 manifest"):
        verify_checkpoint(tmp_path / "notes")
