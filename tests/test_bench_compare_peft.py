"""``peftlab bench methods --compare-peft``: our training step beside Hugging Face PEFT's for the
methods PEFT also has (read from the registry's declared PEFT formats), on a tiny Llama in this
process: the records' fields, the report's table, the plot, the methods planned and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftlab.bench import cli
from peftlab.bench.compare_peft import COMPARE, peft_type_of
from peftlab.bench.compare_report import HEADER
from peftlab.bench.standard import RESULTS, Options, all_methods, plan
from peftlab.bench.standard_run import FULL
from peftlab.core.registry import get_method, method_specs

PNG = b"\x89PNG\r\n\x1a\n"
ARGV = ["methods", "--preset", "smoke", "--compare-only", "--models", "tiny-llama", "--workers", "0",
        "--compare-repeats", "2", "--quiet"]


def lines(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / RESULTS).read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "tiny"
    code = cli.main([*ARGV, "--methods", "lora,lora_fa,mam,full", "--out", str(out)])
    return out, code


def test_compare_records_hold_both_libraries_measurements(compared):
    out, code = compared
    assert code == 0
    by = {r["config"]: r for r in lines(out)}
    # mam (a hybrid) and full fine-tuning have no PEFT counterpart; --compare-only runs no training run.
    assert set(by) == {"lora", "lora_fa"}
    for r in by.values():
        assert r["job_kind"] == COMPARE and r["status"] == "ok", r.get("error")
        assert r["model"] == "tiny-llama" and r["task"] == "smoke" and r["peft_type"] == "LORA"
        for lib in ("peftlab", "peft"):
            assert r[f"{lib}_step_ms"] > 0 and r[f"{lib}_cpu_ms"] > 0 and r[f"{lib}_peak_mb"] >= 0
            assert len(r[f"{lib}_steps_ms"]) == r["repeats"] == 2
        assert r["time_ratio"] == pytest.approx(r["peftlab_step_ms"] / r["peft_step_ms"])
        assert r["peak_diff_mb"] == pytest.approx(r["peftlab_peak_mb"] - r["peft_peak_mb"])
        # The same model on the same batch: same weights, same logits, same trainable tensors.
        assert r["logits_max_abs_diff"] <= 1e-5
        assert r["peftlab_trainable"] == r["peft_trainable"] > 0
    # LoRA-FA keeps A frozen: PEFT's A is frozen to match (PEFT itself would train it).
    assert by["lora_fa"]["frozen_in_peft_to_match"] and all(".lora_A." in k for k in by["lora_fa"]["frozen_in_peft_to_match"])
    assert by["lora"]["frozen_in_peft_to_match"] == []
    assert by["lora_fa"]["peft_trainable"] < by["lora"]["peft_trainable"]


def test_report_table_has_a_row_per_compared_method_and_a_plot(compared):
    out, _ = compared
    text = (out / "report.md").read_text()
    assert "peftlab vs Hugging Face PEFT" in text and "| " + " | ".join(HEADER) + " |" in text
    by = {r["config"]: r for r in lines(out)}
    for name, r in by.items():
        (row,) = [x for x in text.splitlines() if x.startswith(f"| `{name}` |")]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:4] == [f"{r['peftlab_step_ms']:.0f}", f"{r['peft_step_ms']:.0f}", f"{r['time_ratio']:.2f}x"]
        assert cells[4:7] == [f"{r['peftlab_peak_mb']:.0f}", f"{r['peft_peak_mb']:.0f}", f"{r['peak_diff_mb']:+.0f}"]
        assert cells[-1].startswith("time ") and ", mem " in cells[-1]
    assert "`mam`" not in text and (out / "peft_compare.png").read_bytes()[:8] == PNG


def test_rerun_skips_recorded_comparisons(compared, capsys):
    out, _ = compared
    before = (out / RESULTS).read_text()
    assert cli.main([*ARGV, "--methods", "lora,lora_fa,mam,full", "--out", str(out)]) == 0
    assert "0 run now" in capsys.readouterr().out and (out / RESULTS).read_text() == before


def test_the_compared_methods_come_from_the_registry():
    for spec in method_specs():
        assert peft_type_of(spec.name) == (spec.peft.peft_type if spec.peft else None), spec.name
    assert peft_type_of(FULL) is None and peft_type_of("lora+ia3") is None
    opts = Options(preset="smoke", compare_only=True).resolved()
    planned = {j["method"] for j in plan(opts)}
    assert planned == {m for m in all_methods() if peft_type_of(m)} and all(j["job_kind"] == COMPARE for j in plan(opts))
    assert {"lora", "dora", "ia3", "prompt", "adalora", "vera", "boft", "lnfit"} <= planned
    # A method registered later with a PEFT format is compared without an edit.
    from peftlab.core import registry
    from peftlab.core.registry import PeftFormat
    from peftlab.methods.reparam.lora import LoraConfig

    class ProbeConfig(LoraConfig):
        pass

    lora = get_method("lora")
    registry.register_method("compare_probe", ProbeConfig, lora.build, family="reparam", sites=lora.sites,
                             merges=lora.merges, per_row=lora.per_row, example="compare_probe",
                             default_lr=lora.default_lr, peft=PeftFormat("LORA", read=None, write=lora.peft.write))
    try:
        assert "compare_probe" in {j["method"] for j in plan(Options(preset="smoke", compare_only=True).resolved())}
    finally:
        registry._METHODS.pop("compare_probe")


def test_a_method_that_does_not_apply_is_recorded(tmp_path):
    out = tmp_path / "na"
    argv = [a if a != "tiny-llama" else "tiny-bert" for a in ARGV]
    assert cli.main([*argv, "--methods", "llama_adapter", "--out", str(out)]) == 0
    (r,) = lines(out)
    assert r["status"] == "not_applicable" and "BertForSequenceClassification" in r["error"]
    assert "not_applicable" in (out / "report.md").read_text()


def test_bad_repeats_exit_2(tmp_path, capsys):
    assert cli.main(["methods", "--compare-peft", "--compare-repeats", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--compare-repeats must be at least 1" in capsys.readouterr().err
