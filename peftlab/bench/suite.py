"""Planning and running ``peftlab bench lora``: the job list, isolation, progress, the JSON report.

Every training row runs in a fresh subprocess (peak memory must not leak between rows); the
inference and mixed-batch sections run one subprocess per model, with their variants interleaved.
Tiny test models run in-process (a subprocess costs seconds of imports). The report is rewritten
after every job, so an interrupted run leaves what it measured.
"""

from __future__ import annotations

import json
import os
import platform
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from peftlab.bench import libs
from peftlab.bench.lora import ADAPTER_COUNTS, JOBS, REFERENCE_ROWS, TRAIN_ROWS
from peftlab.bench.measure import WorkerError, run_isolated
from peftlab.bench.models import SPECS
from peftlab.bench.targets import evaluate

SECTIONS = ("train", "infer", "mixed")


@dataclass
class Options:
    """What to run (see ``peftlab bench lora --help``)."""

    models: tuple[str, ...] = ("smollm2", "minilm")
    steps: int = 3
    out: str = "runs/bench_lora.json"
    quick: bool = False
    only: tuple[str, ...] = SECTIONS
    #: The training rows to run (default every one of ``lora.TRAIN_ROWS``).
    rows: tuple[str, ...] = tuple(TRAIN_ROWS)
    #: Both libraries of an adapter row in one process, their steps timed alternately.
    interleave: bool = False
    threads: int = 0  # 0: torch.get_num_threads()
    device: str = "auto"
    seed: int = 0
    isolate: str = "auto"  # auto (subprocess except for tiny models), always, never
    decode_factor: int = 4  # decode steps are cheap: time steps x this many
    plot: bool = True
    timeout: float = 1800.0

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


def plan(opts: Options) -> list[dict[str, Any]]:
    """The jobs, in run order. Training rows of one variant run back to back, alternating which
    library goes first, so that slow drift in the machine's load does not favour one library."""
    common = {"threads": opts.threads or torch.get_num_threads(), "steps": opts.steps, "seed": opts.seed,
              "device": opts.resolved_device(), "quick": opts.quick, "decode_factor": opts.decode_factor}
    jobs: list[dict[str, Any]] = []
    for model in opts.models:
        if "train" in opts.only:
            for row in [r for r in REFERENCE_ROWS if r in opts.rows]:
                jobs.append({**common, "kind": "train", "model": model, "row": row, "lib": "torch"})
            for i, row in enumerate([r for r in libs.VARIANTS if r in opts.rows]):
                if opts.interleave:
                    jobs.append({**common, "kind": "train_pair", "model": model, "row": row, "lib": "both"})
                    continue
                order = libs.LIBS if i % 2 == 0 else libs.LIBS[::-1]
                jobs += [{**common, "kind": "train", "model": model, "row": row, "lib": lib} for lib in order]
        if "infer" in opts.only:
            jobs.append({**common, "kind": "infer", "model": model})
        if "mixed" in opts.only:
            jobs.append({**common, "kind": "mixed", "model": model})
    return jobs


def rows_of(job: dict[str, Any]) -> int:
    """How many table rows a job produces (for the progress bar)."""
    if job["kind"] in ("train", "train_pair"):
        return 1 if job["kind"] == "train" else len(libs.LIBS)
    if job["kind"] == "infer":
        return 5
    phases = 2 if SPECS[job["model"]].decoder else 1
    return phases * (1 + 3 * len(ADAPTER_COUNTS))


def _isolated(opts: Options, job: dict[str, Any]) -> bool:
    if opts.isolate == "always":
        return True
    if opts.isolate == "never":
        return False
    return job["model"] != "tiny"


def run_job(opts: Options, job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in a fresh subprocess or in this process; the result records the machine's load
    average (1 min) before and after, since other processes on the machine distort timings."""
    before = _load()
    result = run_isolated(job, timeout=opts.timeout) if _isolated(opts, job) else JOBS[job["kind"]](job)
    result["load_avg"] = [before, _load()]
    return result


def _load() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _meta(opts: Options, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:  # pragma: no cover - peft is a dev dependency
        peft_version = None
    from peftlab import __version__

    return {
        "options": {**asdict(opts), "models": list(opts.models), "only": list(opts.only), "rows": list(opts.rows)},
        "threads": jobs[0]["threads"] if jobs else opts.threads,
        "device": opts.resolved_device(),
        "versions": {"peftlab": __version__, "peft": peft_version, "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "notes": [
            "time_s: median wall-clock seconds of the timed steps after 1 warm-up; cpu_s: median process CPU seconds",
            "peak_mb: peak memory above the loaded model (train rows, each in a fresh subprocess)",
            "decoder prefill computes the last position's logits only (logits_to_keep=1), as generate() does",
            f"decode: one new token per row over a copy of the prefill's cache, timed steps x {opts.decode_factor}",
            "mixed: row i uses adapter a{i mod n}; switch = peftlab set_adapter per group, one forward per group",
            "infer and mixed variants are timed round-robin (one call of each per round)",
        ],
    }


def _merge(report: dict[str, Any], job: dict[str, Any], result: dict[str, Any]) -> None:
    model = job["model"]
    if job["kind"] in ("train", "train_pair"):
        label = REFERENCE_ROWS.get(job["row"]) or libs.VARIANTS[job["row"]].label
        for row in result.get("rows") or [{"lib": job["lib"], **result}]:
            report["train"].append({"model": model, "row": job["row"], "label": label, **row,
                                    "load_avg": result["load_avg"]})
        return
    for row in result["rows"]:
        report[job["kind"]].append({"model": model, **row, "shape": result["shape"], "load_avg": result["load_avg"]})
    for name, diff in result["checks"].items():
        report["checks"].append({"model": model, "section": job["kind"], "check": name, "max_abs_diff": diff})


def write(report: dict[str, Any], out: Path) -> None:
    """Write the report (atomically: a reader never sees half a file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out)


def run(opts: Options, progress: bool = True) -> dict[str, Any]:
    """Run every planned job, write the JSON report (and the plot) and return the report."""
    from tqdm.auto import tqdm

    unknown = [m for m in opts.models if m not in SPECS]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; expected one of smollm2, minilm")
    jobs = plan(opts)
    out = Path(opts.out)
    report: dict[str, Any] = {"meta": _meta(opts, jobs), "train": [], "infer": [], "mixed": [], "checks": [],
                              "errors": [], "targets": [], "complete": False}
    bar = tqdm(total=sum(rows_of(j) for j in jobs), unit="row", desc="bench lora", disable=not progress)
    for job in jobs:
        what = f"{job['model']} {job['kind']} {job.get('row', '')} {job.get('lib', '')}".strip()
        bar.set_postfix_str(what)
        start = time.perf_counter()
        try:
            result = run_job(opts, job)
        except (WorkerError, RuntimeError, ValueError, OSError) as err:
            text = str(err) if isinstance(err, WorkerError) else traceback.format_exc(limit=5)
            report["errors"].append({"job": what, "error": text})
            bar.write(f"bench: {what} failed: {text.strip().splitlines()[-1]}")
        else:
            result["job_wall_s"] = time.perf_counter() - start
            _merge(report, job, result)
        bar.update(rows_of(job))
        report["targets"] = evaluate(report)
        write(report, out)
    bar.close()
    report["complete"] = True
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write(report, out)
    if opts.plot:
        from peftlab.bench.table import plot

        report["plot"] = plot(report, out.with_suffix(".png"))
        write(report, out)
    return report
