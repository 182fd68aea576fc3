"""The training report: collecting it, writing it as JSON, and printing it as a short table."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

REPORT_FILE = "report.json"


def versions() -> dict[str, str | None]:
    """Installed versions of torch, transformers and peftlab (None where not installed)."""
    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "peftlab"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None and paths/tuples made JSON-friendly."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(directory: Path, report: dict[str, Any]) -> Path:
    """Write ``report`` as ``directory/report.json`` (strict JSON) and return the path."""
    path = Path(directory) / REPORT_FILE
    path.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    return path


def format_bytes(n: float | None) -> str:
    """A byte count with a binary unit, e.g. ``12.3 MiB``."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def format_number(value: Any) -> str:
    """Integers with thousands separators, floats with 4 significant decimals, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(rows: Sequence[tuple[str, str]], title: str | None = None) -> str:
    """Two aligned columns (label, value), under an optional title line."""
    width = max((len(label) for label, _ in rows), default=0)
    lines = [title] if title else []
    lines += [f"  {label.ljust(width)}  {value}" for label, value in rows]
    return "\n".join(lines)


def _before_after(before: dict[str, Any] | None, after: dict[str, Any] | None, key: str) -> str:
    b = (before or {}).get(key)
    a = (after or {}).get(key)
    return f"{format_number(b)} -> {format_number(a)}"


def summary_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The rows of the summary table of a training report (missing fields are skipped)."""
    rows: list[tuple[str, str]] = []
    for key in ("model", "task", "method"):
        if report.get(key) is not None:
            rows.append((key, str(report[key])))
    trainable, total = report.get("trainable_params"), report.get("total_params")
    if trainable is not None:
        share = f" ({100.0 * trainable / total:.3f}%)" if total else ""
        rows.append(("trainable params", f"{format_number(trainable)} / {format_number(total)}{share}"))
    if report.get("changed_params") is not None:
        rows.append(("changed params", format_number(report["changed_params"])))
    if report.get("ranks"):
        ranks = sorted(set(report["ranks"].values()))
        rows.append(("ranks", f"{', '.join(map(str, ranks))} over {len(report['ranks'])} modules"))
    before, after = report.get("metrics_before"), report.get("metrics_after")
    baseline = report.get("baseline") or {}
    for name in report.get("metric_names", []):
        floor = (baseline.get("metrics") or {}).get(name)
        shown = f" ({baseline['kind']} baseline {format_number(floor)})" if floor is not None else ""
        rows.append((name, _before_after(before, after, name) + shown))
    if before or after:
        rows.append(("eval loss", _before_after(before, after, "loss")))
    rows.extend(honesty_rows(report))
    curve = report.get("loss_curve") or []
    if curve:
        rows.append(("train loss", f"{format_number(curve[0])} -> {format_number(curve[-1])} "
                                   f"(first -> last step)"))
    if report.get("steps") is not None:
        epochs = report.get("epochs")
        rows.append(("steps", f"{report['steps']}" + (f" ({epochs:.2f} epochs)" if epochs else "")))
    if report.get("wall_time_s") is not None:
        rows.append(("wall time", f"{report['wall_time_s']:.1f} s (train steps {report.get('train_time_s', 0):.1f} s)"))
    if report.get("examples_per_s") is not None:
        rows.append(("throughput", f"{report['examples_per_s']:.1f} examples/s, "
                                   f"{report.get('tokens_per_s', 0):,.0f} tokens/s"))
    if report.get("peak_memory_bytes") is not None:
        method = report.get("peak_memory_method", "")
        note = "allocated on GPU" if method.startswith("cuda") else "RSS above the start of training"
        rows.append(("peak memory", f"{format_bytes(report['peak_memory_bytes'])} ({note}, {method})"))
    if report.get("bytes_on_disk") is not None:
        rows.append(("adapter size", format_bytes(report["bytes_on_disk"])))
    return rows


def honesty_rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows that keep a report honest: the no-skill baseline's prediction, a WARNING when the model
    does not beat it (or answers one class for everything), and the examples cut or left out for
    length in a generative run."""
    rows: list[tuple[str, str]] = []
    baseline = report.get("baseline") or {}
    if baseline:
        prediction = baseline.get("prediction")
        share = f", {100 * baseline['share']:.1f}% of eval" if baseline.get("share") is not None else ""
        rows.append(("baseline", f"{baseline['kind']}: always {format_number(prediction)}{share}"))
    warning = (report.get("baseline_check") or {}).get("warning")
    if warning:
        rows.append(("WARNING", warning))
    scores = report.get("metrics_after") or report.get("metrics") or {}
    if scores.get("no_answer") is not None:
        rows.append(("no answer found", f"{scores['no_answer']:,} of {scores.get('examples', 0):,} generations "
                                        "(the answer regex matched nothing; counted as misses)"))
    for split, counts in (report.get("lengths") or {}).items():
        rows.append((f"{split} lengths", f"{counts['examples']:,} kept, {counts['truncated']:,} truncated, "
                                         f"{counts['dropped']:,} dropped (limit {counts['limit']} tokens)"))
    return rows
