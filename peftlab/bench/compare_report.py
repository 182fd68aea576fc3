"""The ``--compare-peft`` part of ``report.md`` and its plot (``peft_compare.png``), from the compare
records of ``results.jsonl`` (:mod:`peftlab.bench.compare_peft`).

Per model, one row per method: our median step time and PEFT's, their ratio (wall clock, and CPU time
of the process, which other processes on a shared machine disturb less), both peaks above the memory
in use before the step and their difference, and the verdict against the issue's target "no worse than
PEFT" with the tolerances of ``peftlab bench lora`` (:mod:`peftlab.bench.targets`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftlab.bench.compare_peft import COMPARE
from peftlab.bench.targets import MEM_ABS_MB, MEM_TOL, TIME_TOL, no_worse_mem, no_worse_time

Record = dict[str, Any]
PLOT = "peft_compare.png"
HEADER = ["Method", "our step ms", "PEFT step ms", "ratio", "our peak MB", "PEFT peak MB", "diff MB",
          "CPU ratio", "logits diff", "verdict"]


def compare_records(records: list[Record]) -> list[Record]:
    """The compare records among ``records``, by model then method."""
    return sorted((r for r in records if r.get("job_kind") == COMPARE), key=lambda r: (r["model"], r["config"]))


def verdict(r: Record) -> str:
    """``time ok|behind, mem ok|behind``: wall time (or CPU time) within :data:`TIME_TOL` of PEFT's,
    peak within :data:`MEM_TOL` + :data:`MEM_ABS_MB` MB of PEFT's."""
    time_ok = no_worse_time(r["peftlab_step_ms"], r["peft_step_ms"]) or no_worse_time(r["peftlab_cpu_ms"], r["peft_cpu_ms"])
    mem_ok = no_worse_mem(r["peftlab_peak_mb"], r["peft_peak_mb"])
    return f"time {'ok' if time_ok else 'behind'}, mem {'ok' if mem_ok else 'behind'}"


def _row(r: Record) -> list[str]:
    if r.get("status") != "ok":
        why = (r.get("error") or "").strip().splitlines()[0][:140] if r.get("error") else ""
        return [f"`{r['config']}`", *["-"] * 8, f"{r.get('status')}: {why}"]
    return [f"`{r['config']}`", f"{r['peftlab_step_ms']:.0f}", f"{r['peft_step_ms']:.0f}", f"{r['time_ratio']:.2f}x",
            f"{r['peftlab_peak_mb']:.0f}", f"{r['peft_peak_mb']:.0f}", f"{r['peak_diff_mb']:+.0f}",
            f"{r['cpu_ratio']:.2f}x", f"{r['logits_max_abs_diff']:.0e}", verdict(r)]


def compare_table(records: list[Record], model: str) -> str:
    """The markdown table of one model's compare records."""
    rows = [_row(r) for r in compare_records(records) if r["model"] == model]
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def compare_section(records: list[Record]) -> str:
    """The report's section: how it was measured, then a table per model ("" without compare records)."""
    mine = compare_records(records)
    if not mine:
        return ""
    ok = [r for r in mine if r.get("status") == "ok"]
    first = ok[0] if ok else mine[0]
    parts = [
        "\n## Training step: peftlab vs Hugging Face PEFT (`--compare-peft`)\n",
        f"Each method's default config (task head in `modules_to_save`) in one process with PEFT's twin (our "
        f"adapter saved in PEFT's format, rebuilt by `peft.get_peft_model` and loaded with our tensors), on the "
        f"first batch of "
        f"`{first['task']}` (shape {first.get('batch_shape', '?')}), AdamW at the method's default lr; median of "
        f"{first.get('repeats', '?')} timed steps per library, ours and PEFT's alternating after one untimed "
        f"round; peak = the larger of two steps per library (the first creates the optimizer state), above the "
        f"memory in use before the step, after one untimed backward per model (memory "
        f"`{first.get('memory_method', '?')}`: on CPU, `+live_rss` = glibc's mmap threshold fixed at 128 KiB, "
        f"so that the RSS follows live tensors); PEFT version {first.get('peft_version', '?')}. ratio = ours / PEFT "
        f"(below 1: ours faster). Verdict: time no worse than PEFT within {TIME_TOL:.0%} on wall or CPU time, "
        f"peak within {MEM_TOL:.0%} + {MEM_ABS_MB:.0f} MB. logits diff: the largest |our logit − PEFT's| on "
        f"the batch before training, eval mode: 0 where both hold the same weights (P-tuning's file holds the "
        f"computed prompt, as PEFT's own does, so PEFT's encoder starts from its own init: same shapes, other "
        f"values).",
    ]
    for model in dict.fromkeys(r["model"] for r in mine):
        parts += [f"\n### {model}\n", compare_table(records, model)]
    parts.append(f"\n![peftlab vs PEFT]({PLOT})")
    return "\n".join(parts)


def compare_plot(records: list[Record], out: Path) -> str | None:
    """``peft_compare.png``: per model, the time ratio and the peak difference per method."""
    ok = [r for r in compare_records(records) if r.get("status") == "ok"]
    if not ok:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = list(dict.fromkeys(r["model"] for r in ok))
    height = 0.3 * max(sum(r["model"] == m for r in ok) for m in models) + 1.6
    fig, axes = plt.subplots(len(models), 2, figsize=(12, height * len(models)), squeeze=False)
    for row, model in zip(axes, models):
        rs = [r for r in ok if r["model"] == model]
        names = [r["config"] for r in rs]
        ratios = [r["time_ratio"] for r in rs]
        row[0].barh(names, ratios, color=["tab:green" if v <= 1 + TIME_TOL else "tab:red" for v in ratios])
        row[0].axvline(1.0, color="black", lw=0.8)
        row[0].set_xlabel("step time, peftlab / PEFT (median, interleaved)")
        row[0].set_title(f"{model}: time")
        diffs = [r["peak_diff_mb"] for r in rs]
        row[1].barh(names, diffs, color=["tab:green" if no_worse_mem(r["peftlab_peak_mb"], r["peft_peak_mb"])
                                          else "tab:red" for r in rs])
        row[1].axvline(0.0, color="black", lw=0.8)
        row[1].set_xlabel("peak memory, peftlab − PEFT (MB)")
        row[1].set_title(f"{model}: memory")
        for ax in row:
            ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path = out / PLOT
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
