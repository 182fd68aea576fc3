"""``peftlab bench methods``: every registered method x models x tasks x seeds under one budget
(seed 001 §12-13: a standard benchmark, the same conditions for every method, all three parameter
counts reported).

The plan iterates the method registry, so a method registered later is benchmarked without an edit
here, plus full fine-tuning as the reference row. Every run uses its method's declared
``default_lr`` and its *default* config (``peftlab.apply(model, name)``: the dataclass defaults,
targets resolved per architecture), not the registry's ``example`` string: the examples are
written for the tiny test architectures (``targets=q_proj|v_proj`` names Llama's projections, not
BERT's), and the default is what a user gets from ``peftlab train --method NAME``. Steps, batch
size, max length, data and seeds are the same for every method.

Runs execute in a :class:`~peftlab.bench.workers.WorkerPool`; each finished run is appended at
once to ``DIR/results.jsonl`` (failed and not-applicable runs too), so an interrupted benchmark
keeps what it measured, and re-running the command skips every run already recorded (keyed by
job kind, config string, model, task and seed). ``DIR/report.md`` and the plots are rebuilt at the end.
With ``--compare-peft`` the plan also holds one job per model and method that Hugging Face PEFT
also has (:mod:`peftlab.bench.compare_peft`): our training step beside PEFT's, time and memory.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from peftlab.bench.compare_peft import COMPARE, COMPARE_DONE, DEFAULT_REPEATS, compare_jobs
from peftlab.bench.standard_run import FULL, FULL_FT_LR

RESULTS = "results.jsonl"
META = "meta.json"
#: Statuses a re-run skips (``failed`` too unless ``retry_failed``).
DONE = ("ok", "not_applicable", *COMPARE_DONE)
#: The ``job_kind`` of a benchmark run's job and record (a compare job's is ``COMPARE``; ``kind`` is the task's).
RUN = "run"


@dataclass(frozen=True)
class Preset:
    """A named benchmark: models, tasks, seeds and the shared budget, plus how to run it."""

    models: tuple[str, ...]
    tasks: tuple[str, ...]
    seeds: int
    steps: int
    batch_size: int
    max_length: int
    train_limit: int | None
    eval_limit: int | None
    workers: int = 2
    threads: int = 1
    fresh_process: bool = True
    timeout: float = 3600.0
    note: str = ""


PRESETS: dict[str, Preset] = {
    # Seconds on 2 cores: part of `make test`.
    "smoke": Preset(("tiny-bert", "tiny-llama"), ("smoke",), 1, 12, 16, 32, 128, 64,
                    fresh_process=False, timeout=300.0,
                    note="tiny random models (hash tokenizer) on a synthetic sentiment task: checks the pipeline, "
                         "not the methods"),
    # About an hour on the project's 2-core CPU machine.
    "glue-small": Preset(("minilm",), ("glue_sst2", "glue_mrpc", "glue_rte", "glue_stsb"), 1, 80, 16, 128, 1600, 256,
                         note="MiniLM (22.7M), four GLUE tasks subsampled (1,600 train examples, 256 eval)"),
    # The full grid: meant for a GPU (or days of CPU).
    "full": Preset(("minilm", "smollm2"), ("glue_sst2", "glue_mrpc", "glue_rte", "glue_stsb", "glue_qnli",
                                           "glue_mnli_subset", "glue_qqp_subset"), 3, 1000, 32, 128, None, None,
                   workers=1, threads=0, timeout=6 * 3600.0,
                   note="MiniLM and SmolLM2-135M, seven GLUE tasks (full local splits), three seeds"),
}


@dataclass
class Options:
    """What to run (see ``peftlab bench methods --help``); ``None`` fields take the preset's value."""

    preset: str = "smoke"
    out: str = "runs/bench_methods"
    methods: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    tasks: tuple[str, ...] | None = None
    user_task: dict[str, Any] | None = None  # --data ...: {"name", "data", "eval_data", "text_cols", "label_col"}
    seeds: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    max_length: int | None = None
    train_limit: int | None = None
    eval_limit: int | None = None
    workers: int | None = None
    threads: int | None = None
    fresh_process: bool | None = None
    timeout: float | None = None
    device: str = "cpu"
    retry_failed: bool = False
    #: Also compare our training step with Hugging Face PEFT's (``--compare-peft``); ``compare_only``:
    #: run the comparison alone; ``compare_repeats``: interleaved timed steps per library.
    compare_peft: bool = False
    compare_only: bool = False
    compare_repeats: int = DEFAULT_REPEATS
    argv: list[str] = field(default_factory=list)

    def resolved(self) -> Options:
        """A copy with every ``None`` filled from the preset."""
        preset = PRESETS[self.preset]
        filled = {k: getattr(preset, k) for k in ("models", "seeds", "steps", "batch_size", "max_length",
                                                  "train_limit", "eval_limit", "workers", "threads",
                                                  "fresh_process", "timeout") if getattr(self, k) is None}
        if self.tasks is None:
            filled["tasks"] = () if self.user_task else preset.tasks
        if self.methods is None:
            filled["methods"] = tuple(all_methods())
        return replace(self, **filled)


def all_methods() -> list[str]:
    """Full fine-tuning, then every registered method by name (read from the registry now)."""
    import peftlab  # noqa: F401 - importing peftlab registers the built-in methods
    from peftlab.core.registry import method_specs

    return [FULL, *(spec.name for spec in method_specs())]


def budget(opts: Options) -> dict[str, Any]:
    """The budget every run shares (recorded in each result line; a re-run must match it)."""
    return {"steps": opts.steps, "batch_size": opts.batch_size, "max_length": opts.max_length,
            "train_limit": opts.train_limit, "eval_limit": opts.eval_limit, "eval_batch_size": 64,
            "warmup_ratio": 0.06, "lr": "method default_lr", "full_lr": FULL_FT_LR, "device": opts.device}


def task_entries(opts: Options) -> list[dict[str, Any]]:
    """The tasks to run as job entries: registered names, the synthetic ``smoke`` task, the user's files."""
    from peftlab.bench.smoke import SMOKE_TASK
    from peftlab.train.tasks import get_task

    entries = [{"name": SMOKE_TASK, "source": "smoke"} if t == SMOKE_TASK
               else {"name": get_task(t).name, "source": "registered"} for t in opts.tasks or ()]
    if opts.user_task:
        entries.append({**opts.user_task, "source": "file"})
    return entries


def plan(opts: Options) -> list[dict[str, Any]]:
    """Every job: models x tasks x seeds x methods, in that nesting order (none with
    ``compare_only``), then with ``compare_peft`` or ``compare_only`` one compare job per model and
    method that PEFT also has, on the first task."""
    shared = budget(opts)
    tasks = task_entries(opts)
    jobs = [] if opts.compare_only else [
        {"job_kind": RUN, "method": method, "model": model, "task": task, "seed": seed, "budget": shared,
         "device": opts.device, "threads": opts.threads}
        for model in opts.models or () for task in tasks
        for seed in range(opts.seeds or 1) for method in opts.methods or ()]
    if (opts.compare_peft or opts.compare_only) and tasks:
        jobs += compare_jobs(list(opts.methods or ()), list(opts.models or ()), tasks[0], shared, opts.device,
                             opts.threads or 0, opts.compare_repeats)
    return jobs


def key(item: dict[str, Any]) -> tuple[str, str, str, str, int]:
    """The identity of a run, from a job or a record: (job kind, config string, model, task, seed)."""
    task = item["task"]["name"] if isinstance(item["task"], dict) else item["task"]
    return (item.get("job_kind") or RUN, item.get("config") or item["method"], item["model"], task, int(item["seed"]))


def read_results(out: Path) -> list[dict[str, Any]]:
    """The records of ``out/results.jsonl`` in file order (a torn last line is ignored)."""
    path = out / RESULTS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def latest(records: list[dict[str, Any]]) -> dict[tuple[str, str, str, str, int], dict[str, Any]]:
    """The last record of each run (a retried run's newer line wins)."""
    return {key(r): r for r in records if r.get("model") is not None and r.get("task") is not None}


class BudgetMismatch(ValueError):
    """``DIR`` holds runs made under another budget: mixing them would compare unlike runs."""


def check_budget(records: list[dict[str, Any]], shared: dict[str, Any], out: Path) -> None:
    """Refuse to add runs to ``out`` when its recorded runs used another budget."""
    for r in records:
        if r.get("budget") and r["budget"] != shared:
            diff = ", ".join(f"{k} {r['budget'].get(k)!r} -> {shared.get(k)!r}" for k in shared
                             if r["budget"].get(k) != shared.get(k))
            raise BudgetMismatch(f"{out / RESULTS} holds runs with another budget ({diff}); "
                                 "use another --out or the same settings")


def _append(out: Path, record: dict[str, Any]) -> None:
    from peftlab.train.report import json_safe

    with open(out / RESULTS, "a") as f:
        f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def meta(opts: Options) -> dict[str, Any]:
    """Settings, machine and versions, for ``meta.json`` and the report's header."""
    from peftlab.train.report import versions

    return {"preset": opts.preset, "note": PRESETS[opts.preset].note, "argv": opts.argv,
            "options": {k: v for k, v in asdict(opts).items() if k != "argv"}, "budget": budget(opts),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "versions": versions(), "written": time.strftime("%Y-%m-%dT%H:%M:%S")}


def run(opts: Options, progress: bool = True) -> dict[str, Any]:
    """Run the benchmark's missing runs, then write the report and plots. Returns a summary:
    ``planned``, ``skipped``, ``ran``, ``failed`` (this call's failures), ``report``, ``plots``."""
    from tqdm.auto import tqdm

    from peftlab.bench.standard_report import write_report
    from peftlab.bench.workers import WorkerPool

    opts = opts.resolved()
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = plan(opts)
    previous = read_results(out)
    check_budget(previous, budget(opts), out)
    skip = DONE if opts.retry_failed else (*DONE, "failed")
    done = {k for k, r in latest(previous).items() if r.get("status") in skip}
    todo = [j for j in jobs if key(j) not in done]
    (out / META).write_text(json.dumps(meta(opts), indent=2) + "\n")
    failed: list[str] = []
    bar = tqdm(total=len(jobs), initial=len(jobs) - len(todo), unit="run", desc="bench methods",
               disable=not progress, dynamic_ncols=True, file=sys.stderr)

    def on_result(job: dict[str, Any], record: dict[str, Any]) -> None:
        record = {**record, "job_kind": job.get("job_kind") or RUN, "config": job["method"], "model": job["model"],
                  "task": job["task"]["name"], "seed": job["seed"], "budget": job["budget"]}
        record.setdefault("method", job["method"])
        _append(out, record)
        what = f"{job['method']}{' vs PEFT' if record['job_kind'] == COMPARE else ''} {job['model']} {job['task']['name']}"
        if record["status"] == "failed":
            failed.append(f"{what} seed {job['seed']}: {record['error']}")
            bar.write(f"bench methods: {failed[-1].splitlines()[0]}")
        bar.set_postfix_str(what, refresh=False)
        bar.update(1)

    try:
        if todo and opts.workers == 0:  # in this process (debugging)
            from peftlab.bench.standard_run import run_one

            for job in todo:
                on_result(job, run_one(job))
        elif todo:
            pool = WorkerPool(opts.workers or 1, out / "logs", threads=opts.threads or 0,
                              fresh=bool(opts.fresh_process), timeout=opts.timeout)
            pool.run(todo, on_result)
    finally:
        bar.close()
    records = list(latest(read_results(out)).values())  # every run in DIR: one budget, so comparable
    paths = write_report(out, records, meta(opts))
    return {"planned": len(jobs), "skipped": len(jobs) - len(todo), "ran": len(todo), "failed": failed, **paths}
