"""Training data: the task registry, finding the local benchmark folder, loading a task (local
files or the ``datasets`` hub) or a user's own file, and batching for a model.

A task name resolves like this: :func:`get_task` finds its :class:`TaskSpec`; the data directory is
``$PEFTLAB_DATA`` when that variable is set, else the first ``shared/data`` folder above the
current directory or above this package; if ``<data dir>/<task>/<file>`` exists it is read,
otherwise the task is fetched with ``datasets.load_dataset(hub_id, config, split=...)``. Either
way the rows pass through :func:`_normalise_task`, so both sources give equal :class:`Examples`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from peftlab.train.batching import (
    Collator,
    EncodedDataset,
    collate,
    encode,
    make_loader,
)
from peftlab.train.examples import DataError, Examples, Label
from peftlab.train.files import (
    SUPPORTED_SUFFIXES,
    KindRequest,
    RawRecord,
    build_labels,
    clean_texts,
    pick_columns,
    read_rows,
)
from peftlab.train.heads import head_module_names
from peftlab.train.tasks import TASKS, TaskSpec, get_task

__all__ = [
    "TASKS", "TaskSpec", "get_task", "Examples", "DataError", "find_data_dir", "load_task",
    "load_file", "encode", "collate", "Collator", "EncodedDataset", "make_loader",
    "head_module_names", "default_metrics", "SUPPORTED_SUFFIXES",
]

ENV_VAR = "PEFTLAB_DATA"
_INT_RE = re.compile(r"^[+-]?\d+$")
_PACKAGE_DIR = Path(__file__).resolve().parent


def _search_roots() -> list[Path]:
    return [Path.cwd().resolve(), _PACKAGE_DIR]


def find_data_dir() -> Path | None:
    """The benchmark data directory, or None.

    ``$PEFTLAB_DATA`` wins when set (None if it is not a directory: the variable is taken as the
    user's choice, not skipped). Otherwise the first ``shared/data`` directory found walking up
    from the current directory, then from this package's directory.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        return path if path.is_dir() else None
    for root in _search_roots():
        for folder in (root, *root.parents):
            candidate = folder / "shared" / "data"
            if candidate.is_dir():
                return candidate
    return None


def where_looked() -> str:
    """Where :func:`find_data_dir` looked, for error messages."""
    env = os.environ.get(ENV_VAR)
    if env:
        return f"${ENV_VAR}={env}"
    roots = " and ".join(str(r) for r in _search_roots())
    return f"shared/data above {roots} (${ENV_VAR} not set)"


def _task_label(spec: TaskSpec, record: RawRecord) -> Label:
    """One raw label of a registered task as its class id (or float target)."""
    value = record.label
    if spec.kind == "regression":
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise DataError(f"{record.where}: label {value!r} is not a number") from None
    if isinstance(value, str):
        text = value.strip()
        if text in spec.label_names:
            return spec.label_names.index(text)
        value = int(text) if _INT_RE.match(text) else text
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{record.where}: label {value!r} is not one of {', '.join(spec.label_names)}")
    if not 0 <= value < spec.num_labels:
        raise DataError(f"{record.where}: label {value} outside 0..{spec.num_labels - 1}"
                        " (an unlabelled test split?)")
    return value


def _normalise_task(spec: TaskSpec, records: Iterable[RawRecord], source: str) -> Examples:
    """The single path from raw rows (local or hub) to :class:`Examples` for a registered task."""
    texts: list[tuple[str, ...]] = []
    labels: list[Label] = []
    for record in records:
        texts.append(clean_texts(record))
        labels.append(_task_label(spec, record))
    if not texts:
        raise DataError(f"{source}: no rows")
    return Examples(
        texts=texts,
        labels=labels,
        label_names=list(spec.label_names),
        kind=spec.kind,
        metrics=list(spec.metrics),
        task=spec.name,
        source=source,
    )


def _local_records(spec: TaskSpec, path: Path) -> list[RawRecord]:
    columns, rows = read_rows(path, header=spec.header)
    return pick_columns(path, columns, rows, spec.text_cols, spec.label_col)


def _hub_records(spec: TaskSpec, split: str) -> tuple[list[RawRecord], str]:
    hub_split = spec.hub_split(split)
    source = f"{spec.hub_id}/{spec.hub_config}[{hub_split}]"
    local = spec.file_for(split)
    help_text = (f"task {spec.name!r}: no local file {spec.folder}/{local} (looked in "
                 f"{where_looked()}); set ${ENV_VAR} to a folder holding {spec.folder}/{local}")
    try:
        import datasets  # noqa: PLC0415 - optional dependency, imported only when needed
    except ImportError:
        raise DataError(f"{help_text}, or `pip install datasets` to fetch {source} "
                        "from the hub") from None
    try:
        table = datasets.load_dataset(spec.hub_id, spec.hub_config, split=hub_split)
    except Exception as err:  # noqa: BLE001 - the hub fails in many ways; all mean "not here"
        raise DataError(f"{help_text}; fetching {source} from the hub failed: "
                        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    records = []
    wanted = (*spec.hub_text_cols, spec.hub_label_col)
    for i, row in enumerate(table):
        missing = [c for c in wanted if c not in row]
        if missing:
            raise DataError(f"{source} row {i} has no column {missing[0]!r}; columns are: {', '.join(row)}")
        records.append(RawRecord(f"{source} row {i}", tuple(row[c] for c in spec.hub_text_cols),
                                 row[spec.hub_label_col]))
    return records, source


def load_task(name: str, split: str = "train", limit: int | None = None, seed: int = 0) -> Examples:
    """Load split ``"train"`` or ``"eval"`` of a registered task as :class:`Examples`.

    Reads the local benchmark folder when it holds the task (see :func:`find_data_dir`), else the
    ``datasets`` hub. ``limit`` keeps a deterministic random subset chosen with ``seed``.
    Raises :class:`DataError` for an unknown task or when neither source is available.
    """
    spec = get_task(name)
    file_name = spec.file_for(split)
    data_dir = find_data_dir()
    path = data_dir / spec.folder / file_name if data_dir is not None else None
    if path is not None and path.is_file():
        examples = _normalise_task(spec, _local_records(spec, path), str(path))
    else:
        records, source = _hub_records(spec, split)
        examples = _normalise_task(spec, records, source)
    return examples.sample(limit, seed)


def default_metrics(kind: str, num_labels: int) -> list[str]:
    """Metrics used for a user's file: Pearson/Spearman for regression, accuracy (plus F1 of
    class 1 when binary) for classification."""
    if kind == "regression":
        return ["pearson", "spearman"]
    return ["accuracy", "f1"] if num_labels == 2 else ["accuracy"]


def load_file(
    path: str | os.PathLike[str],
    text_cols: Sequence[str],
    label_col: str,
    *,
    kind: KindRequest = "auto",
    label_names: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    header: bool = True,
) -> Examples:
    """Load a user's CSV, TSV, JSONL or JSON file (chosen by extension) as :class:`Examples`.

    ``text_cols`` names one or two text columns and ``label_col`` the label (with
    ``header=False``, 0-based column numbers such as ``"3"``, see :func:`read_rows`); see
    :func:`peftlab.train.files.build_labels` for how labels become ids. Pass the train split's
    ``label_names`` (and ``kind``) when loading its eval file so ids agree. ``metrics`` defaults
    to :func:`default_metrics`. Raises :class:`DataError` with a one-line reason on bad input.
    """
    file = Path(path)
    columns, rows = read_rows(file, header=header)
    records = pick_columns(file, columns, rows, list(text_cols), label_col)
    texts = [clean_texts(r) for r in records]
    labels, names, task_kind = build_labels([(r.where, r.label) for r in records], kind, label_names)
    if task_kind == "classification" and label_names is None and len(names) < 2:
        raise DataError(f"{file}: label column {label_col!r} has a single class {names}; "
                        "classification needs at least two")
    num_labels = 1 if task_kind == "regression" else len(names)
    examples = Examples(
        texts=texts,
        labels=labels,
        label_names=names,
        kind=task_kind,
        metrics=list(metrics) if metrics else default_metrics(task_kind, num_labels),
        task=None,
        source=str(file),
    )
    return examples.sample(limit, seed)

