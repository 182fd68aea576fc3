"""The benchmark's printed tables (plain aligned text) and its plot (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from peftlab.bench.targets import MEM_ABS_MB, MEM_TOL, TIME_TOL, mixed_ratios


def aligned(header: Sequence[str], rows: Sequence[Sequence[str]], title: str = "") -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([title, rule, line(header), rule, *(line(r) for r in rows), rule] if title else [line(header), *map(line, rows)])


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}" if v < 1 else f"{v:.2f}"


def _mb(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _verdicts(targets: list[dict[str, Any]], model: str, row: str, kinds: Sequence[str] | None = None) -> str:
    short = {"train_time": "time", "train_mem": "mem", "train_mem_below": "mem<", "dora_overhead_time": "dora-t",
             "dora_overhead_mem": "dora-m", "merged_at_base_speed": "base-speed", "prefill32_vs_base": ">=.95 base",
             "decode32_vs_base": ">=.7 base", "decode32_vs_peft": ">=1.5 PEFT"}
    hits = [t for t in targets if t["model"] == model and t["row"] == row and (kinds is None or t["target"] in kinds)]

    def name(target: str) -> str:
        base, _, sfx = target.partition("@")
        return short.get(base, base) + (f"@{sfx}" if sfx else "")

    return " ".join(f"{name(t['target'])}:{'pass' if t['passed'] else 'FAIL'}" for t in hits) or ""


def train_table(report: dict[str, Any]) -> str:
    rows = []
    index = {(r["model"], r["row"], r["lib"]): r for r in report["train"]}
    for model, row in dict.fromkeys((r["model"], r["row"]) for r in report["train"]):
        ref = index.get((model, row, "torch"))
        if ref:
            rows.append([f"{model} {ref['label']}", _s(ref["time_s"]), "(ref)", "", _s(ref["cpu_s"]), "(ref)", "",
                         _mb(ref["peak_mb"]), "(ref)", "", "", ""])
            continue
        pl, pf = index.get((model, row, "peftlab")), index.get((model, row, "peft"))
        label = (pl or pf)["label"]
        g = lambda r, k: r.get(k) if r else None  # noqa: E731
        ratio = g(pl, "time_s") / g(pf, "time_s") if pl and pf and pf["time_s"] else None
        cratio = g(pl, "cpu_s") / g(pf, "cpu_s") if pl and pf and pf["cpu_s"] else None
        dmem = g(pl, "peak_mb") - g(pf, "peak_mb") if pl and pf else None
        trainable = f"{g(pl, 'trainable') or '-'}/{g(pf, 'trainable') or '-'}"
        rows.append([f"{model} {label}", _s(g(pl, "time_s")), _s(g(pf, "time_s")), _x(ratio),
                     _s(g(pl, "cpu_s")), _s(g(pf, "cpu_s")), _x(cratio), _mb(g(pl, "peak_mb")),
                     _mb(g(pf, "peak_mb")), "-" if dmem is None else f"{dmem:+.0f}", trainable,
                     _verdicts(report["targets"], model, row)])
    header = ["train step", "peftlab s", "PEFT s", "pl/PEFT", "pl cpu s", "PEFT cpu s", "cpu pl/PEFT",
              "peftlab MB", "PEFT MB", "d MB", "trainable pl/PEFT", "targets"]
    return aligned(header, rows, "1. Training step (forward+backward+AdamW): median time, peak memory above the loaded model")


def infer_table(report: dict[str, Any]) -> str:
    rows = []
    for model in dict.fromkeys(r["model"] for r in report["infer"]):
        by = {(r["row"], r["lib"]): r for r in report["infer"] if r["model"] == model}
        base = by.get(("base", "torch"))
        for row in ("base", "unmerged", "merged"):
            if row == "base":
                if base:
                    rows.append([f"{model} base", _s(base["time_s"]), "(ref)", "1.00x", "", _s(base["cpu_s"]), "(ref)", "1.00x", "", ""])
                continue
            pl, pf = by.get((row, "peftlab")), by.get((row, "peft"))
            vs = lambda r, k="time_s": _x(r[k] / base[k]) if r and base else "-"  # noqa: E731
            rows.append([f"{model} LoRA q,v {row}", _s(pl and pl["time_s"]), _s(pf and pf["time_s"]), vs(pl), vs(pf),
                         _s(pl and pl["cpu_s"]), _s(pf and pf["cpu_s"]), vs(pl, "cpu_s"), vs(pf, "cpu_s"),
                         _verdicts(report["targets"], model, row)])
    header = ["inference (prefill)", "peftlab s", "PEFT s", "pl/base", "PEFT/base",
              "pl cpu s", "PEFT cpu s", "pl/base cpu", "PEFT/base cpu", "targets"]
    return aligned(header, rows, "2. Inference, no grad, training batch shape")


def mixed_table(report: dict[str, Any]) -> str:
    rows = []
    keyed = {(r["model"], r["phase"], r["variant"], r["lib"], r["adapters"]): r for r in report["mixed"]}
    cpu = mixed_ratios(report, "cpu_s")
    for model, phase in dict.fromkeys((r["model"], r["phase"]) for r in report["mixed"]):
        base = keyed.get((model, phase, "base", "torch", 0))
        for n in sorted({r["adapters"] for r in report["mixed"] if r["adapters"]}):
            pl = keyed.get((model, phase, "mixed", "peftlab", n))
            pf = keyed.get((model, phase, "mixed", "peft", n))
            sw = keyed.get((model, phase, "switch", "peftlab", n))
            get = lambda r, k: r[k] if r else None  # noqa: E731
            verdict = _verdicts(report["targets"], model, phase) if n == 32 else ""
            c_pl = cpu.get((model, phase, "mixed", "peftlab", n), (None, None))
            c_pf = cpu.get((model, phase, "mixed", "peft", n), (None, None))
            rows.append([f"{model} {phase} {n} adapters", _s(get(base, "time_s")), _s(get(pl, "time_s")), _s(get(pf, "time_s")),
                         _s(get(sw, "time_s")), _x(get(pl, "vs_base")), _x(get(pl, "vs_peft")), _x(get(pf, "vs_base")),
                         _x(get(sw, "vs_base")), _x(c_pl[0]), _x(c_pl[1]), _x(c_pf[0]), verdict])
    header = ["mixed batch", "base s", "peftlab s", "PEFT s", "switch s", "pl/base", "pl/PEFT", "PEFT/base", "switch/base",
              "pl/base cpu", "pl/PEFT cpu", "PEFT/base cpu", "targets"]
    return aligned(header, rows, "3. Mixed-adapter batches (throughput relative to the base and to PEFT's mixed batch)")


def checks_table(report: dict[str, Any]) -> str:
    rows = [[f"{c['model']} {c['section']} {c['check']}", f"{c['max_abs_diff']:.2e}"] for c in report["checks"]]
    return aligned(["cross-check", "max |diff|"], rows, "Correctness cross-checks (same adapters in both libraries)")


def render(report: dict[str, Any]) -> str:
    """Every section that has rows, the cross-checks, the target summary and any errors."""
    parts = []
    if report["train"]:
        parts.append(train_table(report))
    if report["infer"]:
        parts.append(infer_table(report))
    if report["mixed"]:
        parts.append(mixed_table(report))
    if report["checks"]:
        parts.append(checks_table(report))
    targets = report["targets"]
    if targets:
        failed = [t for t in targets if not t["passed"]]
        lines = [f"Targets: {len(targets) - len(failed)}/{len(targets)} pass "
                 f"(tolerance: time {TIME_TOL:.0%}, memory {MEM_TOL:.0%} + {MEM_ABS_MB:.0f} MB; 'below' has none)"]
        lines += [f"  FAIL {t['model']} {t['row']} {t['target']}: {t['text']}" for t in failed]
        parts.append("\n".join(lines))
    for err in report.get("errors", []):
        parts.append(f"ERROR {err['job']}: {err['error'].strip().splitlines()[-1]}")
    return "\n\n".join(parts)


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a JSON report back, with its targets re-evaluated."""
    import json

    from peftlab.bench.targets import evaluate

    report = json.loads(Path(path).read_text())
    report["targets"] = evaluate(report)
    return report


def plot(report: dict[str, Any], path: Path) -> str | None:
    """Grouped bars per model: training step time and peak memory, peftlab vs PEFT per row (reference
    rows as one grey bar), and inference time. Returns the file written, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    models = list(dict.fromkeys(r["model"] for r in report["train"] + report["infer"]))
    if not models:
        return None
    fig, axes = plt.subplots(3, len(models), figsize=(7 * len(models), 12), squeeze=False)
    colors = {"peftlab": "tab:blue", "peft": "tab:orange", "torch": "tab:gray"}
    for col, model in enumerate(models):
        train = [r for r in report["train"] if r["model"] == model]
        rows = list(dict.fromkeys(r["row"] for r in train))
        labels = [next(r["label"] for r in train if r["row"] == row) for row in rows]
        for ax, key, unit in ((axes[0][col], "time_s", "s / step"), (axes[1][col], "peak_mb", "MB above model")):
            for i, row in enumerate(rows):
                for r in (r for r in train if r["row"] == row):
                    offset = 0.0 if r["lib"] == "torch" else (-0.2 if r["lib"] == "peftlab" else 0.2)
                    ax.bar(i + offset, r[key], width=0.4 if r["lib"] != "torch" else 0.6, color=colors[r["lib"]])
            ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(unit)
            ax.set_title(f"{model}: train step {'time' if key == 'time_s' else 'peak memory'}")
        ax = axes[2][col]
        infer = [r for r in report["infer"] if r["model"] == model]
        for i, row in enumerate(("base", "unmerged", "merged")):
            for r in (r for r in infer if r["row"] == row):
                offset = 0.0 if r["lib"] == "torch" else (-0.2 if r["lib"] == "peftlab" else 0.2)
                ax.bar(i + offset, r["time_s"], width=0.4 if r["lib"] != "torch" else 0.6, color=colors[r["lib"]])
        ax.set_xticks(range(3), ["base", "LoRA unmerged", "LoRA merged"])
        ax.set_ylabel("s / forward")
        ax.set_title(f"{model}: inference (prefill)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, ["peftlab", "PEFT", "reference (no adapter)"], loc="upper center", ncol=3)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
