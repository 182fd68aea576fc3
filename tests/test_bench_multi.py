"""``peftlab bench multi`` end to end on a tiny BERT directory: real ``peftlab train`` processes (two
sequential runs and one joint run), their JSON, the printed table with each target's verdict, the plot,
and re-printing from the JSON. Timings are measured and reported, never asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.bench.cli import main
from peftlab.train.data import find_data_dir


@pytest.mark.skipif(find_data_dir() is None, reason="shared/data not found")
def test_bench_multi_runs_every_configuration(tiny_run_args: list[str], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_run_args[tiny_run_args.index("--model") + 1]
    out = tmp_path / "multi.json"
    assert main(["multi", "--model", model, "--tasks", "sst2,stsb", "--steps", "2", "--batch-size", "4",
                 "--max-length", "16", "--train-limit", "16", "--eval-limit", "8", "--rounds", "1", "--threads", "1",
                 "--variants", "joint", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    seq, joint = result["rounds"][0]["sequential"], result["rounds"][0]["joint"]
    assert [r["task"] for r in seq["runs"]] == ["sst2", "stsb"]
    assert all(r["wall_s"] > 0 and r["cpu_s"] > 0 and r["peak_rss_bytes"] > 50 * 2**20 for r in seq["runs"])
    assert seq["wall_s"] == pytest.approx(sum(r["wall_s"] for r in seq["runs"]))
    assert seq["peak_rss_bytes"] == max(r["peak_rss_bytes"] for r in seq["runs"])
    # peftlab train's default: passes of one adapter batch (4 rows), 2 per joint micro-step.
    assert (joint["max_rows"], joint["forward_passes"]) == (4, 4)
    assert [a["task"] for a in joint["adapters"]] == ["glue_sst2", "glue_stsb"]
    assert [a["metric"] for a in joint["adapters"]] == ["accuracy", "pearson"]
    summary = result["summary"]["configurations"]
    assert summary["joint"]["wall_vs_sequential"] == pytest.approx(joint["wall_s"] / seq["wall_s"])
    targets = result["summary"]["targets"]
    assert [(t["configuration"], t["met"]) for t in targets] == [
        ("joint", summary["joint"]["wall_vs_sequential"] <= 0.8),
        ("joint", summary["joint"]["peak_rss_vs_one_run"] <= 1.2)]
    assert printed.count("target joint") == 2 and "sequential (one run per adapter)" in printed
    assert out.with_suffix(".png").stat().st_size > 1000
    assert main(["multi", "--from-json", str(out), "--no-plot"]) == 0
    assert capsys.readouterr().out.splitlines()[:5] == printed.splitlines()[:5]
