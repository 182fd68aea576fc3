"""``peftlab bench lora`` on a tiny random Llama: every row for both libraries, and a correctness
cross-check inside the benchmark (the same adapters give the same mixed-batch outputs in peftlab and
in Hugging Face PEFT). Timings are only checked to be positive, never compared."""

from __future__ import annotations

import json

import pytest

import peft  # noqa: E402,F401  (a dev dependency: installed by make test from the lock)

from peftlab.bench import cli  # noqa: E402
from peftlab.bench.libs import LIBS, VARIANTS  # noqa: E402
from peftlab.bench.lora import ADAPTER_COUNTS, REFERENCE_ROWS  # noqa: E402
from peftlab.bench.measure import run_isolated  # noqa: E402

FAST = ["--models", "tiny", "--quick", "--steps", "1", "--threads", "1", "--decode-factor", "1", "--quiet"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench_lora.json"
    assert cli.main(["lora", *FAST, "--out", str(out)]) == 0
    return json.loads(out.read_text()), out


def test_every_training_row_for_both_libraries(report):
    data, _ = report
    assert data["complete"] and not data["errors"]
    got = {(r["row"], r["lib"]): r for r in data["train"] if r["model"] == "tiny"}
    expected = [(row, "torch") for row in REFERENCE_ROWS] + [(v, lib) for v in VARIANTS for lib in LIBS]
    assert sorted(got) == sorted(expected)
    for key, row in got.items():
        assert row["time_s"] > 0, key
        assert row["peak_mb"] >= 0 and row["memory_method"], key
    for v in VARIANTS:  # the same adapter in both libraries: the same number of trainable parameters
        assert got[(v, "peftlab")]["trainable"] == got[(v, "peft")]["trainable"] > 0, v


def test_inference_rows_and_merge_checks(report):
    data, _ = report
    got = {(r["row"], r["lib"]) for r in data["infer"] if r["time_s"] > 0}
    assert got == {("base", "torch"), *((s, lib) for s in ("unmerged", "merged") for lib in LIBS)}
    checks = {c["check"]: c["max_abs_diff"] for c in data["checks"] if c["section"] == "infer"}
    assert checks["peftlab_vs_peft_unmerged"] <= 1e-4
    assert checks["peftlab_merged_vs_unmerged"] <= 1e-4
    assert checks["adapter_vs_base"] > 1e-3  # the adapter is not a no-op, so the checks mean something


def test_mixed_rows_and_peft_cross_check(report):
    data, _ = report
    rows = {(r["phase"], r["variant"], r["lib"], r["adapters"]): r for r in data["mixed"]}
    for phase in ("prefill", "decode"):
        assert rows[(phase, "base", "torch", 0)]["time_s"] > 0
        for n in ADAPTER_COUNTS:
            for key in (("mixed", "peftlab"), ("mixed", "peft"), ("switch", "peftlab")):
                row = rows[(phase, *key, n)]
                assert row["time_s"] > 0 and row["vs_base"] > 0 and row["vs_peft"] > 0
    checks = {c["check"]: c["max_abs_diff"] for c in data["checks"] if c["section"] == "mixed"}
    for phase in ("prefill", "decode"):
        assert checks[f"{phase}_adapters_change_output"] > 1e-3
        for n in ADAPTER_COUNTS:
            assert checks[f"{phase}_{n}_peftlab_vs_peft"] <= 1e-4, (phase, n)
            assert checks[f"{phase}_{n}_switch_vs_mixed"] <= 1e-4, (phase, n)


def test_targets_and_plot(report):
    data, out = report
    kinds = {t["target"] for t in data["targets"]}
    assert {"train_time", "train_mem", "train_mem_below", "dora_overhead_time", "merged_at_base_speed",
            "prefill32_vs_base", "decode32_vs_base", "decode32_vs_peft"} <= kinds
    assert data["plot"] and out.with_suffix(".png").stat().st_size > 0


def test_train_row_in_a_fresh_subprocess():
    job = {"kind": "train", "model": "tiny", "row": "lora_qv_d0.1", "lib": "peftlab", "threads": 1, "steps": 1,
           "seed": 0, "device": "cpu", "quick": True}
    result = run_isolated(job, timeout=120)
    assert result["time_s"] > 0 and result["peak_mb"] >= 0
    assert result["memory_method"] in ("vmhwm", "rss_sampling")


def test_peftlab_command_forwards_to_bench(tmp_path, capsys):
    from peftlab.cli import main as peftlab_main

    out = tmp_path / "b.json"
    assert peftlab_main(["bench", "lora", *FAST, "--only", "infer", "--no-plot", "--out", str(out)]) == 0
    assert "Inference" in capsys.readouterr().out
    assert {r["row"] for r in json.loads(out.read_text())["infer"]} == {"base", "unmerged", "merged"}


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as err:
        cli.main(["lora", "--models", "gpt5"])
    assert err.value.code == 2
    assert cli.main(["lora", "--steps", "0"]) == 2


def test_rows_runs_only_the_training_rows_named(tmp_path):
    out = tmp_path / "rows.json"
    assert cli.main(["lora", *FAST, "--only", "train", "--rows", "lora_qv,dora_qv", "--no-plot", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert sorted((r["row"], r["lib"]) for r in data["train"]) == sorted((v, lib) for v in ("lora_qv", "dora_qv") for lib in LIBS)
    # DoRA's overhead over LoRA is evaluated from these four rows alone.
    assert {t["target"] for t in data["targets"]} >= {"dora_overhead_time", "dora_overhead_mem"}
    with pytest.raises(SystemExit):
        cli.main(["lora", "--rows", "lora_qvv"])


def test_interleave_runs_both_libraries_of_a_row_in_one_process(tmp_path):
    out = tmp_path / "pair.json"
    argv = ["lora", *FAST, "--only", "train", "--rows", "lora_qv,dora_qv", "--interleave", "--no-plot", "--out", str(out)]
    assert cli.main(argv) == 0
    data = json.loads(out.read_text())
    got = {(r["row"], r["lib"]): r for r in data["train"]}
    assert sorted(got) == sorted((v, lib) for v in ("lora_qv", "dora_qv") for lib in LIBS)
    for row in got.values():
        assert row["interleaved"] and row["time_s"] > 0 and row["cpu_s"] > 0 and row["peak_mb"] >= 0
        assert len(row["times_s"]) == 1  # --steps 1: one timed step per library
    for v in ("lora_qv", "dora_qv"):
        assert got[(v, "peftlab")]["trainable"] == got[(v, "peft")]["trainable"] > 0
    assert {t["target"] for t in data["targets"]} >= {"train_time", "train_mem", "dora_overhead_time"}
