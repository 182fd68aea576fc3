"""Registry of benchmark tasks: where each one's data lies locally and on the hub, and how to read it."""

from __future__ import annotations

from dataclasses import dataclass

from peftlab.train.examples import DataError, TaskKind


@dataclass(frozen=True)
class TaskSpec:
    """How to read one task, from the local benchmark folder or from the ``datasets`` hub.

    ``label_names`` fixes the class-id order (the hub's ``ClassLabel`` order), so a local file
    whose labels are words ("entailment") and the hub's integer labels give the same ids.
    ``hub_*`` name the same task on the hub: ``load_dataset(hub_id, hub_config, split=...)``.
    """

    name: str
    text_cols: tuple[str, ...]
    label_col: str
    kind: TaskKind
    num_labels: int
    metrics: tuple[str, ...]
    train_file: str
    eval_file: str
    label_names: tuple[str, ...]
    hub_id: str
    hub_config: str
    hub_train_split: str
    hub_eval_split: str
    hub_text_cols: tuple[str, ...]
    hub_label_col: str = "label"
    note: str = ""
    #: False for files without a header row (GLUE's CoLA): columns are then 0-based numbers.
    header: bool = True

    @property
    def folder(self) -> str:
        """Folder name of the task under the data directory."""
        return self.name

    def file_for(self, split: str) -> str:
        """Local file name of ``split`` ("train" or "eval")."""
        return self.train_file if _check_split(split) == "train" else self.eval_file

    def hub_split(self, split: str) -> str:
        """Hub split name of ``split`` ("train" or "eval")."""
        return self.hub_train_split if _check_split(split) == "train" else self.hub_eval_split


def _check_split(split: str) -> str:
    if split not in ("train", "eval"):
        raise DataError(f"split must be 'train' or 'eval', not {split!r}")
    return split


def _glue(
    name: str,
    config: str,
    text_cols: tuple[str, ...],
    hub_text_cols: tuple[str, ...],
    label_col: str,
    label_names: tuple[str, ...],
    metrics: tuple[str, ...],
    eval_file: str = "dev.tsv",
    hub_eval_split: str = "validation",
    note: str = "",
    header: bool = True,
) -> TaskSpec:
    regression = not label_names
    return TaskSpec(
        name=name,
        text_cols=text_cols,
        label_col=label_col,
        kind="regression" if regression else "classification",
        num_labels=1 if regression else len(label_names),
        metrics=metrics,
        train_file="train.tsv",
        eval_file=eval_file,
        label_names=label_names,
        hub_id="nyu-mll/glue",
        hub_config=config,
        hub_train_split="train",
        hub_eval_split=hub_eval_split,
        hub_text_cols=hub_text_cols,
        note=note,
        header=header,
    )


_SUBSET_NOTE = (
    "local files are fixed samples of the official train set (eval = held-out sample); "
    "the hub fallback gives the full official train and validation splits"
)

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _glue("glue_sst2", "sst2", ("sentence",), ("sentence",), "label",
              ("negative", "positive"), ("accuracy",)),
        _glue("glue_cola", "cola", ("3",), ("sentence",), "1", ("unacceptable", "acceptable"),
              ("mcc", "accuracy"), header=False,
              note="GLUE's own headerless TSVs (source, label, original label, sentence); Matthews correlation"),
        _glue("glue_mrpc", "mrpc", ("#1 String", "#2 String"), ("sentence1", "sentence2"),
              "Quality", ("not_equivalent", "equivalent"), ("accuracy", "f1")),
        _glue("glue_rte", "rte", ("sentence1", "sentence2"), ("sentence1", "sentence2"),
              "label", ("entailment", "not_entailment"), ("accuracy",)),
        _glue("glue_stsb", "stsb", ("sentence1", "sentence2"), ("sentence1", "sentence2"),
              "score", (), ("pearson", "spearman")),
        _glue("glue_qnli", "qnli", ("question", "sentence"), ("question", "sentence"),
              "label", ("entailment", "not_entailment"), ("accuracy",),
              note="local train is a 9,999-row sample of the official train set"),
        _glue("glue_mnli_subset", "mnli", ("sentence1", "sentence2"), ("premise", "hypothesis"),
              "label", ("entailment", "neutral", "contradiction"), ("accuracy",),
              eval_file="heldout.tsv", hub_eval_split="validation_matched", note=_SUBSET_NOTE),
        _glue("glue_qqp_subset", "qqp", ("sentence1", "sentence2"), ("question1", "question2"),
              "label", ("not_duplicate", "duplicate"), ("accuracy", "f1"),
              eval_file="heldout.tsv", note=_SUBSET_NOTE),
    )
}


def get_task(name: str) -> TaskSpec:
    """The spec of task ``name``; also accepts short forms such as ``sst2``, ``SST-2`` or ``mnli``.

    Raises :class:`DataError` listing the known tasks when the name is unknown.
    """
    if name in TASKS:
        return TASKS[name]
    key = name.strip().lower().replace("-", "").replace(" ", "")
    for candidate in (key, f"glue_{key}", f"glue_{key}_subset"):
        if candidate in TASKS:
            return TASKS[candidate]
    raise DataError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
