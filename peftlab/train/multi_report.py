"""What a multi-adapter run reports: the joint table printed at the end, and a plot of every
adapter's loss curve (``loss_curves.png``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftlab.train.report import format_bytes, format_number

JOINT_HEADER = ("adapter", "method", "task", "steps", "lr", "metric", "before", "after", "train loss", "trainable")


def format_columns(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns under a header line."""
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() for row in (header, *rows))


def joint_table(report: dict[str, Any]) -> str:
    """The printed summary of a joint run: one line per adapter, then the shared measurements."""
    rows = []
    for name, adapter in report["adapters"].items():
        curve = adapter.get("loss_curve") or [None]
        rows.append((name, adapter["method"], adapter["task"], str(adapter["steps"]), f"{adapter['lr']:g}",
                     adapter["metric"], format_number(adapter.get("metric_before")),
                     format_number(adapter.get("metric_after")),
                     f"{format_number(curve[0])} -> {format_number(curve[-1])}",
                     format_number(adapter.get("trainable_params"))))
    memory = report.get("peak_memory_bytes")
    lines = [
        f"peftlab train: {len(rows)} adapters over one {report['model']} base -> {report['out']}",
        format_columns(JOINT_HEADER, rows),
        f"joint steps: {report['micro_steps']} micro-steps in {report['forward_passes']} forward passes"
        + (f" of at most {report['max_rows']} rows" if report.get("max_rows") else " (one per micro-step)"),
        f"wall time {report['wall_time_s']:.1f} s (train steps {report['train_time_s']:.1f} s); peak memory "
        f"{format_bytes(memory)} above the start of training ({report.get('peak_memory_method', '')})",
    ]
    return "\n".join(lines)


def plot_loss_curves(adapters: dict[str, dict[str, Any]], path: Path) -> Path | None:
    """Each adapter's training loss per optimizer step, one panel per adapter (their scales differ:
    cross-entropy, MSE), into ``path``; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    n = len(adapters)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False)
    for ax, (name, adapter) in zip(axes[0], adapters.items()):
        curve = adapter.get("loss_curve") or []
        ax.plot(range(1, len(curve) + 1), curve, lw=1.2)
        ax.set_title(f"{name}\n{adapter['method']} on {adapter['task']}", fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
    fig.suptitle("adapters trained in one joint run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
