"""The log of a training run: one JSON object per line in ``DIR/log.jsonl`` (each optimizer step:
step, epoch, loss, lr, grad norm, tokens/s, examples/s; each evaluation: step and ``eval_<metric>``),
and the same scalars as TensorBoard event files under ``DIR/tensorboard`` when the ``tensorboard``
package is installed (its absence is said once, in the note, and is not an error).

Resuming at step N keeps the lines of steps up to N and drops the rest (the steps the killed run
took after its last checkpoint, which the resumed run takes again), so the file of a resumed run
reads like that of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

LOG_FILE = "log.jsonl"
TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_MISSING = ("TensorBoard logs off: the tensorboard package is not installed (pip install tensorboard); "
                       "log.jsonl has the same numbers")


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl`` file; a line that does not parse (the last line of a killed
    run may be cut short) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _tensorboard_writer(directory: Path, purge_step: int | None) -> tuple[Any, str | None]:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
    except ImportError:  # torch imports the tensorboard package here
        return None, TENSORBOARD_MISSING
    return SummaryWriter(str(directory), purge_step=purge_step), None


class RunLog:
    """Context manager writing the run's log under ``directory`` (see the module docstring).

    ``resume_step``: the step the run resumes from (lines of later steps are dropped);
    None for a new run, whose log starts empty. ``note`` is None, or why TensorBoard is off (also
    printed once to ``stderr`` when ``warn`` is true)."""

    def __init__(self, directory: str | Path, resume_step: int | None = None, warn: bool = True) -> None:
        """Open ``directory/log.jsonl`` (and the TensorBoard writer, when installed)."""
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / LOG_FILE
        kept = []
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_log(self.path) if int(r.get("step", 0)) <= resume_step]
        temp = self.path.with_suffix(".jsonl.tmp")
        temp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        temp.replace(self.path)
        self._file = self.path.open("a")
        purge = resume_step + 1 if resume_step is not None else None
        self.writer, self.note = _tensorboard_writer(self.directory / TENSORBOARD_DIR, purge)
        if self.note and warn:
            print(f"peftlab: {self.note}", file=sys.stderr)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (must have ``step``) as one line; its numbers also go to TensorBoard."""
        record = {k: _finite(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key.replace("eval_", "eval/", 1) if key.startswith("eval_")
                                           else f"train/{key}", value, record["step"])

    def close(self) -> None:
        """Flush and close the files."""
        self._file.close()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> RunLog:
        """The log itself."""
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Close the log."""
        self.close()
