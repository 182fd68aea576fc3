"""The registration benchmark (``python -m peftlab.serve.bench.registration``) on the tiny Llama:
every adapter registered and timed, the summary made from those times, the table and the plot."""

from __future__ import annotations

import json

import pytest

from peftlab.serve.bench.registration import main


def test_every_adapter_is_registered_and_timed(tmp_path, capsys):
    out = tmp_path / "registration.json"
    assert main(["--model", "tiny", "--adapters", "6", "--adapter-dir", str(tmp_path / "adapters"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["registered"] == 6 and len(result["wall_ms"]) == len(result["cpu_ms"]) == 6
    assert result["host_adapter_bytes"] > 0
    summary = result["summary"]
    assert summary["wall_total_s"] == pytest.approx(sum(result["wall_ms"]) / 1000)
    assert summary["cpu_first_ms"] == result["cpu_ms"][0]
    assert min(result["wall_ms"][1:]) <= summary["wall_median_ms"] <= summary["wall_p90_ms"] <= max(result["wall_ms"][1:])
    assert out.with_suffix(".png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "6 registered" in printed and "| wall |" in printed and "| cpu |" in printed


def test_bad_counts_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--adapters", "0", "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2 and "--adapters" in capsys.readouterr().err
