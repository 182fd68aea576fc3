"""``peftlab bench methods``: the smoke preset end to end (every registered method on a tiny BERT and
a tiny Llama, in a pool of two persistent workers, under 90 s), re-runs that skip what is recorded,
failures and inapplicable pairs recorded rather than dropped, a method registered later planned
without an edit, the user's own data files, and the report's tables and plots."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

import peftlab
from peftlab.bench import cli
from peftlab.bench.smoke import tiny_classifier
from peftlab.bench.standard import RESULTS, Options, all_methods, plan
from peftlab.bench.standard_report import _pareto
from peftlab.bench.standard_run import FULL, not_applicable_reason
from peftlab.bench.workers import WorkerPool
from peftlab.core.registry import get_method, method_specs

SMOKE_MODELS = ("tiny-bert", "tiny-llama")
PNG = b"\x89PNG\r\n\x1a\n"


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / RESULTS).read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_methods") / "smoke"
    start = time.perf_counter()
    code = cli.main(["methods", "--preset", "smoke", "--out", str(out), "--quiet"])
    return out, code, time.perf_counter() - start


def test_smoke_preset_runs_every_registered_method_in_time(smoke):
    out, code, elapsed = smoke
    assert code == 0
    assert elapsed < 90, f"the smoke preset took {elapsed:.0f} s (budget: 90 s on 2 cores)"
    records = lines(out)
    expected = {(m, model) for m in [FULL, *(s.name for s in method_specs())] for model in SMOKE_MODELS}
    keys = [(r["config"], r["model"]) for r in records]
    assert len(keys) == len(set(keys)), "one line per run"
    assert set(keys) == expected
    assert {r["task"] for r in records} == {"smoke"} and {r["seed"] for r in records} == {0}


def test_smoke_only_declared_pairs_are_not_applicable(smoke):
    out, _, _ = smoke
    models = {m: tiny_classifier(m, "classification", 2) for m in SMOKE_MODELS}
    for r in lines(out):
        declared = r["config"] != FULL and not get_method(r["config"]).applies_to(models[r["model"]])
        assert r["status"] == ("not_applicable" if declared else "ok"), (r["config"], r["model"], r.get("error"))
        if declared:
            assert "cannot be applied" in r["error"]
            assert r["error"] == not_applicable_reason(r["config"], models[r["model"]])
    assert any(r["status"] == "not_applicable" for r in lines(out))  # llama_adapter on BERT, bitfit on Llama


def test_smoke_records_hold_the_counts_and_measurements(smoke):
    out, _, _ = smoke
    for r in (r for r in lines(out) if r["status"] == "ok"):
        where = (r["config"], r["model"])
        lr = 5e-5 if r["config"] == FULL else get_method(r["config"]).default_lr
        assert r["lr"] == lr, where
        assert 0 < r["trainable_params"] <= r["base_params"] and r["changed_params"] > 0, where
        assert r["trainable_pct"] == pytest.approx(100 * r["trainable_params"] / r["base_params"]), where
        assert 0 <= r["metric_before"] <= 1 and 0 <= r["metric_after"] <= 1, where
        assert r["metric"] == "accuracy" and r["metrics_after"]["examples"] == 64, where
        assert len(r["loss_curve"]) == r["steps"] == r["budget"]["steps"] == 12, where
        assert r["peak_memory_mb"] >= 0 and r["train_time_s"] > 0 and r["tokens_per_s"] > 0, where
        assert r["config_resolved"].split("[")[0] == r["config"], where
    full = [r for r in lines(out) if r["config"] == FULL]
    assert all(r["trainable_pct"] == 100 for r in full)


def test_smoke_report_tables_and_plots(smoke):
    out, _, _ = smoke
    report = (out / "report.md").read_text()
    tables = report.split("## ")
    for model in SMOKE_MODELS:
        table = next(t for t in tables if t.startswith(f"{model}: metrics after training"))
        for method in [FULL, *(s.name for s in method_specs())]:
            assert f"| `{method}` |" in table, (model, method)
        assert "smoke (acc)" in table and "Avg." in table
    assert "Table VII" not in report  # only for presets that include SmolLM2
    assert "llama_adapter` on tiny-bert" in report and "bitfit` on tiny-llama" in report
    for name in ("metric_vs_params.png", "peak_memory.png", "loss_curves.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
        assert f"]({name})" in report


def test_rerun_skips_every_recorded_run(smoke, capsys):
    out, _, _ = smoke
    before = (out / RESULTS).read_text()
    start = time.perf_counter()
    assert cli.main(["methods", "--preset", "smoke", "--out", str(out), "--quiet"]) == 0
    assert "0 run now" in capsys.readouterr().out
    assert (out / RESULTS).read_text() == before
    assert time.perf_counter() - start < 30  # no worker started: only the report is rebuilt


def test_another_budget_in_the_same_directory_is_refused(smoke, capsys):
    out, _, _ = smoke
    assert cli.main(["methods", "--preset", "smoke", "--steps", "3", "--out", str(out), "--quiet"]) == 2
    assert "another budget" in capsys.readouterr().err


def test_a_method_registered_later_is_planned_and_run(tmp_path):
    from peftlab.core import registry
    from peftlab.methods.selective.bitfit import BitFitConfig

    class ProbeConfig(BitFitConfig):
        pass

    bitfit = get_method("bitfit")
    registry.register_method("bench_probe", ProbeConfig, bitfit.build, family="selective", sites=bitfit.sites,
                             merges=bitfit.merges, per_row=bitfit.per_row, example="bench_probe",
                             default_lr=bitfit.default_lr, needs=bitfit.needs)
    try:
        assert "bench_probe" in all_methods()
        jobs = plan(Options(preset="smoke").resolved())
        assert sum(j["method"] == "bench_probe" for j in jobs) == len(SMOKE_MODELS)
        out = tmp_path / "probe"
        code = cli.main(["methods", "--methods", "bench_probe", "--models", "tiny-bert", "--workers", "0",
                         "--steps", "2", "--out", str(out), "--quiet"])
        assert code == 0
        (record,) = lines(out)
        assert record["method"] == "bench_probe" and record["status"] == "ok" and record["family"] == "selective"
    finally:
        registry._METHODS.pop("bench_probe")


def test_failures_are_recorded_and_retried_on_request(tmp_path, capsys):
    out = tmp_path / "fail"
    argv = ["methods", "--methods", "lora[targets=no_such_module],ia3", "--models", "tiny-bert", "--workers", "0",
            "--steps", "2", "--out", str(out), "--quiet"]
    assert cli.main(argv) == 1
    by = {r["config"]: r for r in lines(out)}
    assert by["ia3"]["status"] == "ok"
    assert by["lora[targets=no_such_module]"]["status"] == "failed"
    assert "no_such_module" in by["lora[targets=no_such_module]"]["error"]
    assert "failed" in (out / "report.md").read_text()
    assert cli.main(argv) == 1 and len(lines(out)) == 2  # recorded failures are skipped...
    assert cli.main([*argv, "--retry-failed"]) == 1 and len(lines(out)) == 3  # ...unless asked; the old line stays
    capsys.readouterr()


def test_a_worker_that_overruns_is_killed_and_its_run_recorded(tmp_path):
    job = {"method": "lora", "model": "tiny-bert", "task": {"name": "smoke", "source": "smoke"}, "seed": 0,
           "budget": {"steps": 2, "batch_size": 4, "max_length": 16}, "threads": 1}
    got = []
    # The worker cannot even import torch in 0.05 s: the job overruns, the worker is killed and the
    # next job runs in a replacement worker.
    WorkerPool(1, tmp_path / "logs", timeout=0.05).run([job], lambda j, r: got.append(r))
    assert len(got) == 1 and got[0]["status"] == "failed" and "timed out" in got[0]["error"]
    got.clear()
    WorkerPool(1, tmp_path / "logs", fresh=True, timeout=120).run([job, {**job, "seed": 1}], lambda j, r: got.append(r))
    assert [r["status"] for r in got] == ["ok", "ok"] and got[0]["pid"] != got[1]["pid"]  # a process per run
    # A persistent worker runs jobs one after another in one process: a run after other runs gives
    # what the same run gives alone in a fresh process (fresh model, every generator seeded).
    from peftlab.bench.standard_run import run_one

    run_one({**job, "method": "ia3", "seed": 3})
    again = run_one(job)
    assert again["loss_curve"] == got[0]["loss_curve"] and again["metric_after"] == got[0]["metric_after"]


def test_user_data_files_as_in_peftlab_train(tmp_path):
    rows = ["text,score"] + [f"{'good great' if i % 2 else 'bad awful'} film number {i},{(i % 5) / 2}" for i in range(40)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.csv").write_text("\n".join(rows[:13]) + "\n")
    out = tmp_path / "mine"
    code = cli.main(["methods", "--methods", "lora,full", "--models", "tiny-bert", "--data", str(tmp_path / "train.csv"),
                     "--eval-data", str(tmp_path / "dev.csv"), "--text-cols", "text", "--label-col", "score",
                     "--workers", "0", "--steps", "3", "--out", str(out), "--quiet"])
    assert code == 0
    records = lines(out)
    assert {r["config"] for r in records} == {"lora", FULL}
    for r in records:
        assert r["task"] == "train" and r["kind"] == "regression" and r["status"] == "ok"
        assert r["metric_names"] == ["pearson", "spearman"] and r["eval_examples"] == 12 and r["train_examples"] == 40
    assert "train (Pearson/Spearman)" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--methods", "lorra"], "unknown method 'lorra'"),
    (["--models", "gpt5"], "--models gpt5"),
    (["--tasks", "cola9"], "unknown task"),
    (["--data", "x.csv", "--text-cols", "a", "--label-col", "y"], "data file not found"),
    (["--text-cols", "a"], "go with --data"),
    (["--steps", "0"], "--steps must be at least 1"),
])
def test_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    assert cli.main(["methods", *argv, "--out", str(tmp_path / "x")]) == 2
    assert message in capsys.readouterr().err


def test_pareto_front():
    points = [(10, 50, "a"), (100, 60, "b"), (100, 55, "c"), (1000, 58, "d"), (5, 40, "e"), (2000, 70, "f")]
    assert [p[2] for p in _pareto(points)] == ["e", "a", "b", "f"]


def test_peftlab_command_forwards_methods(tmp_path, capsys):
    from peftlab.cli import main as peftlab_main

    out = tmp_path / "fw"
    assert peftlab_main(["bench", "methods", "--methods", "lnfit", "--models", "tiny-llama", "--workers", "0",
                         "--steps", "1", "--out", str(out), "--quiet"]) == 0
    assert "1 run now" in capsys.readouterr().out
    assert peftlab.__version__ and lines(out)[0]["status"] == "ok"


def test_training_hooks_get_the_method_deltas_not_the_head_copy():
    """Found by this benchmark: AdaLoRA with the task head in modules_to_save (as peftlab train and the
    benchmark apply it) crashed, its hooks read a rank from the head's copy."""
    import torch

    model = tiny_classifier("tiny-bert", "classification", 2)
    pm = peftlab.apply(model, "adalora", modules_to_save=["classifier"])
    (hooks,) = pm._training["default"]
    assert "classifier" not in hooks.deltas and len(hooks.deltas) > 0
    assert hooks.target_bgt == pm.configs["default"].target_r * len(hooks.deltas)
    pm.begin_training(3)
    ids = torch.randint(3, 128, (4, 8))
    (pm(input_ids=ids, labels=torch.tensor([0, 1, 0, 1])).loss + pm.regularizer()).backward()
    pm.on_step()


def test_average_only_over_every_task_of_the_model():
    """An unfinished benchmark: a row that lacks a task others have gets no average (it would be over
    other tasks than theirs)."""
    from peftlab.bench.standard_report import Grid

    def rec(config, task, value):
        return {"config": config, "model": "m", "task": task, "seed": 0, "status": "ok", "metric_after": value}

    grid = Grid([rec("a", "t1", 0.5), rec("a", "t2", 0.7), rec("b", "t1", 0.9)])
    assert grid.average("m", "a") == pytest.approx(0.6)
    assert grid.average("m", "b") is None
