"""The load benchmark's verdicts on the issue's targets, its printed tables and its plots.

Targets (issue 10), with n = ``compare_at`` adapters (32) whose mix changes at every step:
throughput at least 0.8x the base model's, 10x PEFT's per-request switching, 2x PEFT's mixed batch;
and from 8 to the most adapters run (1,000) throughput falls by less than 10%. Each is evaluated on
wall-clock tokens/s and on tokens per CPU-second (``@cpu``). A soak passes with
no failed request and flat memory (second-half drift under :data:`FLAT_MB` or :data:`FLAT_FRACTION`
of the RSS).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftlab.bench.table import aligned

VS_BASE, VS_SWITCH, VS_MIXED, SCALE_KEEP = 0.8, 10.0, 2.0, 0.9
FLAT_MB, FLAT_FRACTION = 32.0, 0.02


def cell(report: dict[str, Any], system: str, n: int | None = None) -> dict[str, Any] | None:
    """The result of ``system`` with ``n`` adapters (any n for ``base``), or None if it did not run."""
    for c in report.get("cells", []):
        if c["system"] == system and (n is None or c["n_adapters"] == n) and "tokens_per_s" in c:
            return c
    return None


def _target(name: str, value: float | None, limit: float, text: str) -> dict[str, Any]:
    return {"target": name, "value": value, "limit": limit, "passed": value is not None and value >= limit, "text": text}


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's throughput targets on the cells that ran (a target whose cells are missing is
    left out), each on wall-clock tokens/s and again on tokens per CPU-second of the cell's process
    (names ending in ``@cpu``), which other processes on a shared machine distort much less."""
    out = []
    for key, sfx, unit in (("tokens_per_s", "", "tokens/s"), ("tokens_per_cpu_s", "@cpu", "tokens per CPU-second")):
        out += _throughput_targets(report, key, sfx, unit)
    return out


def _throughput_targets(report: dict[str, Any], key: str, sfx: str, unit: str) -> list[dict[str, Any]]:
    n = report["settings"]["compare_at"]
    engine = cell(report, "engine", n)
    out = []
    if engine:
        for system, limit, what in (("base", VS_BASE, "the base model alone"), ("peft_switch", VS_SWITCH, "PEFT switching per request"),
                                    ("peft_mixed", VS_MIXED, "PEFT's mixed batch")):
            other = cell(report, system, None if system == "base" else n)
            if other and other.get(key, 0) > 0:
                ratio = engine[key] / other[key]
                out.append(_target(f"vs_{system}@{n}{sfx}", ratio, limit,
                                   f"{n} adapters: {ratio:.2f}x the {unit} of {what} (target >= {limit:g}x)"))
    counts = sorted(c["n_adapters"] for c in report.get("cells", []) if c["system"] == "engine" and "tokens_per_s" in c)
    small, large = cell(report, "engine", 8), cell(report, "engine", counts[-1]) if counts else None
    if small and large and counts[-1] > 8 and small.get(key, 0) > 0:
        keep = large[key] / small[key]
        out.append(_target(f"scale_8_to_{counts[-1]}{sfx}", keep, SCALE_KEEP,
                           f"8 -> {counts[-1]} adapters keeps {keep:.2f} of the {unit} (target >= {SCALE_KEEP:g})"))
    return out


def soak_verdict(soak: dict[str, Any]) -> dict[str, Any]:
    """Zero failed requests, and memory flat over the second half of the run."""
    drift = soak.get("memory_drift_mb")
    limit = max(FLAT_MB, FLAT_FRACTION * (soak.get("memory_start_mb") or 0.0))
    flat = drift is not None and abs(drift) <= limit
    return {"zero_failed": soak["failed"] == 0, "memory_flat": flat, "drift_limit_mb": limit,
            "passed": soak["failed"] == 0 and flat}


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def cells_table(report: dict[str, Any]) -> str:
    """One row per cell: throughput, latency percentiles, deadline misses, failures, peak memory."""
    header = ("system", "adapters", "ok/failed", "tok/s", "tok/CPU-s", "req/s", "TTFT p50/p90/p99 s", "total p50/p90/p99 s",
              "missed", "peak MB")
    rows = []
    for c in report.get("cells", []):
        if "error" in c:
            rows.append((c["label"], str(c["n_adapters"]), "ERROR", c["error"][:60], "", "", "", "", "", ""))
            continue
        miss = c["deadline_miss_rate"]
        rows.append((c["label"], str(c["n_adapters"]), f"{c['ok']}/{c['failed']}", _f(c["tokens_per_s"], 1),
                     _f(c.get("tokens_per_cpu_s"), 1), _f(c["requests_per_s"]),
                     "/".join(_f(c[f"first_token_p{q}_s"]) for q in (50, 90, 99)),
                     "/".join(_f(c[f"total_p{q}_s"]) for q in (50, 90, 99)),
                     "-" if miss is None else f"{100 * miss:.0f}%", _f(c["peak_mb"], 0)))
    return aligned(header, rows, title="peftlab bench serve")


def render(report: dict[str, Any]) -> str:
    """The printed report: settings, the cells, the targets (or the soak's verdict)."""
    s = report["settings"]
    lines = [f"model {s['model']}, {s['requests'] if not s.get('soak_s') else 'soak ' + str(s['soak_s']) + ' s of'} requests "
             f"at {s['rate']:g}/s (Gamma cv {s['cv']:g}), popularity alpha {s['alpha']:g}, lengths {s['lengths']} "
             f"(prompt <= {s['max_prompt_tokens']}, output <= {s['max_output_tokens']} tokens), max batch {s['max_batch']}, "
             f"{s['threads']} thread(s), {s['device']}; load average {report['meta'].get('load_before')} before, "
             f"{report['meta'].get('load_after')} after", "", cells_table(report)]
    if report.get("soak"):
        soak, verdict = report["soak"], report["soak_verdict"]
        lines += ["", f"soak: {soak['ok']} requests ok, {soak['failed']} failed; RSS {_f(soak.get('memory_start_mb'), 0)} -> "
                      f"{_f(soak.get('memory_end_mb'), 0)} MB, second-half drift {_f(soak.get('memory_drift_mb'), 1)} MB "
                      f"(limit {verdict['drift_limit_mb']:.0f}), slope {_f(soak.get('memory_slope_mb_per_min'), 2)} MB/min: "
                      f"{'PASS' if verdict['passed'] else 'FAIL'}"]
    if report.get("targets"):
        lines += ["", "targets:"] + [f"  {'pass' if t['passed'] else 'FAIL'}  {t['text']}" for t in report["targets"]]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> str | None:
    """Throughput (wall clock and per CPU-second) and latency against the number of adapters (log
    scale): the engine as a line, the base as a dashed level, the PEFT baselines as points; for a
    soak, RSS against time. Returns the file written, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if report.get("soak"):
        samples = report["soak"].get("memory_samples") or []
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([t / 60 for t, _ in samples], [m for _, m in samples], color="tab:blue")
        ax.set_xlabel("minutes")
        ax.set_ylabel("RSS (MiB)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"soak: {report['soak']['ok']} requests ok, {report['soak']['failed']} failed")
    else:
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
        styles = {"engine": ("tab:blue", "o-"), "peft_switch": ("tab:orange", "s"), "peft_mixed": ("tab:green", "^"),
                  "base": ("tab:gray", "--")}
        for ax, key, unit in ((axes[0], "tokens_per_s", "generated tokens / s"),
                              (axes[1], "tokens_per_cpu_s", "generated tokens / CPU-second"),
                              (axes[2], "total_p50_s", "latency (s)")):
            for system, (color, style) in styles.items():
                cells = sorted((c for c in report["cells"] if c["system"] == system and key in c), key=lambda c: c["n_adapters"])
                if not cells:
                    continue
                if system == "base":
                    ax.axhline(cells[0][key], color=color, linestyle="--",
                               label=cells[0]["label"] + (" p50" if key == "total_p50_s" else ""))
                    continue
                xs = [c["n_adapters"] for c in cells]
                ax.plot(xs, [c[key] for c in cells], style, color=color, label=cells[0]["label"] + (" p50" if key == "total_p50_s" else ""))
                if key == "total_p50_s":
                    ax.plot(xs, [c["total_p99_s"] for c in cells], style.replace("-", ":") if "-" in style else style,
                            color=color, alpha=0.5, label=cells[0]["label"] + " p99")
            counts = sorted({c["n_adapters"] for c in report["cells"] if c["system"] != "base" and key in c})
            ax.set_xscale("log")
            ax.set_xticks(counts, [str(n) for n in counts])
            ax.minorticks_off()
            ax.set_xlabel("adapters")
            ax.set_ylabel(unit)
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=7)
        axes[0].set_title("throughput (wall clock)")
        axes[1].set_title("throughput per CPU-second of the server process")
        axes[2].set_title("request latency (arrival to last token)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
