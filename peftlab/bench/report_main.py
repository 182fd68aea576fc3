"""What a one-shot benchmark command shares: matplotlib without a display, and the main() that runs,
prints, writes and plots (``peftlab bench offsite``, ``peftlab bench split``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Result = dict[str, Any]


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 120) -> Path:
    """Lay out, write and close ``fig``; returns ``path``."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def report_main(argv: Sequence[str] | None, parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Result],
                render: Callable[[Result], str], plot: Callable[[Result, Path], Path], plot_name: str) -> int:
    """Parse ``argv``, ``run`` (which writes ``--out``/results.json), print ``render``'s table and write the
    plot ``--out``/``plot_name``."""
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    result = run(args)
    print(render(result))
    print(f"plot: {plot(result, Path(args.out) / plot_name)}")
    return 0
