"""``peftlab bench serve`` at smoke size (a tiny random Llama, in-process cells, seconds): the JSON
report's fields, that refused requests are counted as failed, the soak mode, and the workload's
distributions (power-law popularity, Gamma arrivals, lengths)."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from peftlab.cli import main
from peftlab.serve.bench.workload import WorkloadSpec, arrival_times, make_trace, popularity
from peftlab.train.data import find_data_dir

SMOKE = ["--model", "tiny", "--threads", "1", "--quiet", "--warmup", "1", "--lengths", "uniform:4-8,3-6"]
CELL_FIELDS = {"system", "label", "n_adapters", "requests", "ok", "failed", "failures", "span_s", "generated_tokens",
               "tokens_per_s", "requests_per_s", "deadline_miss_rate", "first_token_p50_s", "first_token_p90_s",
               "first_token_p99_s", "total_p50_s", "total_p90_s", "total_p99_s", "peak_mb", "peak_above_loaded_mb",
               "model_load_s", "adapter_load_s", "engine_stats", "cpu_s", "tokens_per_cpu_s"}


def _run(tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "report.json"
    status = main(["bench", "serve", *SMOKE, "--out", str(out), *args])
    return status, json.loads(out.read_text())


def test_smoke_run_reports_every_system(tmp_path):
    status, report = _run(tmp_path, "--adapters", "1,4", "--peft-adapters", "4", "--requests", "8", "--rate", "100")
    assert status == 0
    cells = {(c["system"], c["n_adapters"]): c for c in report["cells"]}
    assert set(cells) == {("base", 0), ("engine", 1), ("engine", 4), ("peft_switch", 4), ("peft_mixed", 4)}
    for cell in cells.values():
        assert CELL_FIELDS <= set(cell), CELL_FIELDS - set(cell)
        assert cell["requests"] == cell["ok"] == 8 and cell["failed"] == 0 and cell["failures"] == {}
        assert cell["tokens_per_s"] == pytest.approx(cell["generated_tokens"] / cell["span_s"])
        assert cell["requests_per_s"] == pytest.approx(8 / cell["span_s"])
        assert 0 < cell["first_token_p50_s"] <= cell["first_token_p90_s"] <= cell["first_token_p99_s"]
        assert cell["first_token_p50_s"] <= cell["total_p50_s"] <= cell["total_p90_s"] <= cell["total_p99_s"]
        assert 0.0 <= cell["deadline_miss_rate"] <= 1.0 and cell["peak_mb"] > 0
    # greedy decoding of one trace through the same 4 adapters: every system generates the same tokens
    counts = {cells[k]["generated_tokens"] for k in (("engine", 4), ("peft_switch", 4), ("peft_mixed", 4))}
    assert len(counts) == 1, counts
    names = ["vs_base@4", "vs_peft_switch@4", "vs_peft_mixed@4"]
    assert [t["target"] for t in report["targets"]] == names + [f"{n}@cpu" for n in names]
    for cell in cells.values():
        assert cell["tokens_per_cpu_s"] == pytest.approx(cell["generated_tokens"] / cell["cpu_s"])
    for t in report["targets"]:
        assert t["passed"] == (t["value"] >= t["limit"])
    assert report["settings"]["rate"] == 100 and report["meta"]["command"].startswith("peftlab bench serve")
    assert (tmp_path / "report.png").stat().st_size > 0


def test_engine_cells_fuse_steps_unless_told_not_to(tmp_path):
    """The default engine cells run fused steps; --no-fused-steps runs separate calls, and the same
    greedy trace generates the same tokens either way."""
    args = ["--systems", "base,engine", "--adapters", "3", "--requests", "8", "--rate", "1000"]
    _, fused = _run(tmp_path / "fused", *args)
    _, separate = _run(tmp_path / "separate", *args, "--no-fused-steps")
    assert fused["settings"]["fused_steps"] is True and separate["settings"]["fused_steps"] is False
    for a, b in zip(fused["cells"], separate["cells"]):
        assert a["engine_stats"]["fused_calls"] > 0 and b["engine_stats"]["fused_calls"] == 0
        assert a["engine_stats"]["fused_steps"] is True and b["engine_stats"]["fused_steps"] is False
        assert a["generated_tokens"] == b["generated_tokens"] and a["ok"] == b["ok"] == 8


def test_refused_requests_are_counted_as_failed(tmp_path):
    """A burst into a queue of 2: the engine refuses some requests at once (QueueFullError); they are
    counted, by type, never retried or dropped from the totals."""
    status, report = _run(tmp_path, "--systems", "engine", "--adapters", "2", "--requests", "16", "--rate", "100000",
                          "--max-batch", "2", "--max-queue", "2", "--lengths", "uniform:4-8,8-8")
    assert status == 0
    (cell,) = report["cells"]
    assert cell["requests"] == 16 and cell["ok"] + cell["failed"] == 16
    assert cell["failed"] >= 1 and cell["failures"] == {"QueueFullError": cell["failed"]} and cell["ok"] >= 2
    assert cell["tokens_per_s"] == pytest.approx(cell["generated_tokens"] / cell["span_s"])


def test_soak_samples_memory_and_counts_failures(tmp_path):
    status, report = _run(tmp_path, "--soak", "5", "--adapters", "2", "--rate", "10")
    assert status == 0
    soak = report["soak"]
    assert soak["requests"] >= 10 and soak["failed"] == 0
    assert len(soak["memory_samples"]) >= 5 and all(mb > 0 for _, mb in soak["memory_samples"])
    # the drift is over the second half of the loaded run: samples up to the last completion (after
    # it the idle engine frees its key/value cache, which a sample taken then would count as drift)
    loaded = [(t, m) for t, m in soak["memory_samples"] if t <= soak["span_s"]]
    assert len(loaded) < len(soak["memory_samples"])  # the closing sample comes after the span
    half = [m for t, m in loaded if t >= loaded[-1][0] / 2]
    assert soak["memory_drift_mb"] == pytest.approx(half[-1] - half[0])
    assert soak["memory_end_mb"] == loaded[-1][1] and soak["memory_after_idle_mb"] == soak["memory_samples"][-1][1]
    assert set(report["soak_verdict"]) >= {"zero_failed", "memory_flat", "passed"}
    assert report["soak_verdict"]["zero_failed"] is True
    assert (tmp_path / "report.png").stat().st_size > 0


def test_bad_arguments_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "serve", "--model", "tiny", "--lengths", "uniform:9-2,1-1", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--lengths" in err and "uniform:P0-P1,O0-O1" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "serve", "--systems", "engine,vllm"])
    assert exit_info.value.code == 2 and "unknown system 'vllm'" in capsys.readouterr().err


# -- the workload ---------------------------------------------------------------------------------------------
def test_popularity_is_a_power_law():
    p = popularity(10, 1.0)
    assert sum(p) == pytest.approx(1.0) and p[0] / p[1] == pytest.approx(2.0) and p[0] / p[9] == pytest.approx(10.0)
    assert popularity(4, 0.0) == pytest.approx([0.25] * 4)


def test_gamma_arrivals_have_the_set_rate_and_variation():
    for cv in (1.0, 2.0):
        times = arrival_times(4000, rate=5.0, cv=cv, rng=random.Random(0))
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert times[0] == 0.0 and statistics.fmean(gaps) == pytest.approx(0.2, rel=0.1)
        assert statistics.stdev(gaps) / statistics.fmean(gaps) == pytest.approx(cv, rel=0.15)
    assert max(arrival_times(None, rate=5.0, cv=1.0, rng=random.Random(0), duration_s=3.0)) < 3.0


def test_trace_keeps_prompts_across_adapter_counts_and_follows_popularity():
    spec = WorkloadSpec(requests=2000, lengths="uniform:2-5,1-3", seed=1)
    few, many = make_trace(spec, 4, None, 128), make_trace(spec, 100, None, 128)
    assert [r.prompt_ids for r in few] == [r.prompt_ids for r in many]
    assert all(2 <= len(r.prompt_ids) <= 5 and 1 <= r.max_tokens <= 3 for r in few)
    shares = [sum(r.adapter == i for r in few) / len(few) for i in range(4)]
    assert shares == sorted(shares, reverse=True) and shares[0] == pytest.approx(popularity(4, 1.0)[0], abs=0.04)
    assert all(r.adapter is None for r in make_trace(spec, 0, None, 128))


@pytest.mark.skipif(find_data_dir() is None, reason="benchmark data (shared/data) not found")
def test_alpaca_lengths_are_cut_and_clipped():
    from peftlab.serve.bench.cells import load_tokenizer

    spec = WorkloadSpec(requests=20, lengths="alpaca", max_prompt_tokens=16, max_output_tokens=12, min_output_tokens=4)
    trace = make_trace(spec, 2, load_tokenizer("smollm2"), 49152, find_data_dir())
    assert len(trace) == 20 and all(1 <= len(r.prompt_ids) <= 16 and 4 <= r.max_tokens <= 12 for r in trace)
    assert len({len(r.prompt_ids) for r in trace}) > 1 and len({r.max_tokens for r in trace}) > 1
