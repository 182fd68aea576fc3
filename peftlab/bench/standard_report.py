"""``report.md`` and the plots of ``peftlab bench methods``, from the records of ``results.jsonl``.

* a table per model shaped like seed 000's Table III: one row per method (full fine-tuning first),
  one column per task with that task's own metrics (``acc/F1``, ``Pearson/Spearman``) x 100 after
  training, the average of the tasks' first metrics, trainable parameters and their share; the
  best value of each column in bold, the worst underlined;
* a table shaped like Table VII (peak training memory per method, full fine-tuning included) for
  SmolLM2 when the benchmark ran it, and a cost table (counts of seed 001 §12, memory, time,
  throughput) for every model;
* the runs that do not apply (with the ``NotApplicableError`` message) and the failed ones;
* ``metric_vs_params.png`` (average metric against trainable parameters, log x, the Pareto front
  marked), ``peak_memory.png`` and ``loss_curves.png`` (matplotlib, Agg backend).

Means are over seeds; with several seeds a ``± std`` (population) follows the first metric.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftlab.bench.compare_peft import COMPARE
from peftlab.bench.standard_run import FULL

Record = dict[str, Any]
FAMILY_ORDER = ("full", "additive", "selective", "reparam", "hybrid")
METRIC_SHORT = {"accuracy": "acc", "f1": "F1", "pearson": "Pearson", "spearman": "Spearman", "mcc": "MCC"}
PLOTS = ("metric_vs_params.png", "peak_memory.png", "loss_curves.png")


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(values) if values else None


def _count(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}%"


class Grid:
    """Records grouped as model -> config -> task -> [records over seeds], with row order."""

    def __init__(self, records: list[Record]) -> None:
        """Group ``records`` (one per run)."""
        self.cells: dict[str, dict[str, dict[str, list[Record]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        for r in records:
            self.cells[r["model"]][r["config"]][r["task"]].append(r)
        self.models = list(dict.fromkeys(r["model"] for r in records))
        self.tasks = list(dict.fromkeys(r["task"] for r in records))

    def configs(self, model: str) -> list[str]:
        """The model's method rows: full fine-tuning first, then by family and name."""
        def family(config: str) -> str:
            return next((r.get("family") for runs in self.cells[model][config].values() for r in runs
                         if r.get("family")), "") or ("full" if config == FULL else "")

        order = {f: i for i, f in enumerate(FAMILY_ORDER)}
        return sorted(self.cells[model], key=lambda c: (order.get(family(c), len(order)), c))

    def runs(self, model: str, config: str, task: str | None = None) -> list[Record]:
        """The records of one cell (every task's when ``task`` is None)."""
        by_task = self.cells[model][config]
        return list(by_task.get(task, [])) if task else [r for runs in by_task.values() for r in runs]

    def ok(self, model: str, config: str, task: str | None = None) -> list[Record]:
        """The successful records of a cell."""
        return [r for r in self.runs(model, config, task) if r.get("status") == "ok"]

    def value(self, model: str, config: str, task: str, field: str = "metric_after") -> float | None:
        """Mean over seeds of ``field`` (a cell with a failed or inapplicable run has none)."""
        runs = self.runs(model, config, task)
        if not runs or any(r.get("status") != "ok" for r in runs):
            return None
        return _mean([r.get(field) for r in runs])

    def average(self, model: str, config: str) -> float | None:
        """Mean over the model's tasks of the first metric (None unless every task has a value: the
        rows of an unfinished benchmark would otherwise average over different tasks)."""
        tasks = [t for t in self.tasks if any(self.runs(model, c, t) for c in self.cells[model])]
        values = [self.value(model, config, t) for t in tasks]
        return statistics.fmean(values) if values and all(v is not None for v in values) else None

    def field_mean(self, model: str, config: str, field: str) -> float | None:
        """Mean of ``field`` over the successful runs of a row (every task and seed)."""
        return _mean([r.get(field) for r in self.ok(model, config)])


def _task_header(grid: Grid, model: str, task: str) -> str:
    names = next((r.get("metric_names") for c in grid.cells[model] for r in grid.ok(model, c, task)), None)
    short = "/".join(METRIC_SHORT.get(n, n) for n in names) if names else ""
    return f"{task.removeprefix('glue_').removesuffix('_subset')} ({short})" if short else task


def _cell(grid: Grid, model: str, config: str, task: str) -> tuple[str, float | None]:
    runs = grid.runs(model, config, task)
    if not runs:
        return "", None
    status = {r.get("status") for r in runs}
    if "failed" in status:
        return "failed", None
    if status == {"not_applicable"}:
        return "n/a", None
    names = runs[0].get("metric_names") or [runs[0].get("metric")]
    parts = [_mean([(r.get("metrics_after") or {}).get(n) for r in runs]) for n in names]
    text = "/".join("-" if p is None else f"{100 * p:.2f}" for p in parts)
    if len(runs) > 1 and parts[0] is not None:
        text += f" ± {100 * statistics.pstdev([r['metric_after'] for r in runs]):.2f}"
    return text, parts[0]


def _mark(column: list[tuple[str, float | None]]) -> list[str]:
    """Bold the best and underline the worst numeric entry of a column (Table III's convention)."""
    values = [v for _, v in column if v is not None]
    if len(values) < 2:
        return [t for t, _ in column]
    hi, lo = max(values), min(values)
    return [f"**{t}**" if v == hi else f"<u>{t}</u>" if v == lo else t for t, v in column]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def table_iii(grid: Grid, model: str) -> str:
    """Methods x tasks after training (x 100), the average, trainable parameters and their share."""
    configs, tasks = grid.configs(model), [t for t in grid.tasks if any(grid.runs(model, c, t) for c in grid.cells[model])]
    columns = [_mark([_cell(grid, model, c, t) for c in configs]) for t in tasks]
    averages = [grid.average(model, c) for c in configs]
    avg_col = _mark([("-" if a is None else f"{100 * a:.2f}", a) for a in averages])
    rows = []
    for i, config in enumerate(configs):
        fam = next((r.get("family") for r in grid.runs(model, config) if r.get("family")), "")
        rows.append([f"`{config}`", fam or "", _count(grid.field_mean(model, config, "trainable_params")),
                     _pct(grid.field_mean(model, config, "trainable_pct")), *(col[i] for col in columns), avg_col[i]])
    base = [r for r in grid.ok(model, FULL)] or [r for c in configs for r in grid.ok(model, c)]
    if base:
        before = []
        for t in tasks:
            runs = [r for r in base if r["task"] == t]
            names = runs[0].get("metric_names") if runs else []
            vals = [_mean([(r.get("metrics_before") or {}).get(n) for r in runs]) for n in names or []]
            before.append("/".join("-" if v is None else f"{100 * v:.2f}" for v in vals))
        rows.append(["untrained (head only at init)", "", "0", "0%", *before, ""])
    header = ["Method", "family", "#TPs", "TP %", *(_task_header(grid, model, t) for t in tasks), "Avg."]
    return _table(header, rows)


def table_vii(grid: Grid, model: str) -> str:
    """Peak training memory per method (Table VII's shape), full fine-tuning as a row."""
    rows = []
    configs = sorted(grid.configs(model), key=lambda c: -(grid.field_mean(model, c, "peak_memory_mb") or -1))
    for config in configs:
        peak, weights = grid.field_mean(model, config, "peak_memory_mb"), grid.field_mean(model, config, "weights_mb")
        if peak is None:
            continue
        rows.append([f"{model} (`{config}`)", f"{peak:.0f}", f"{peak + (weights or 0):.0f}",
                     _pct(grid.field_mean(model, config, "trainable_pct"))])
    return _table(["Model & method", "peak above loaded model (MB)", "weights + peak (MB)", "TP %"], rows)


def cost_table(grid: Grid, model: str) -> str:
    """Seed 001 §12's three counts, memory, time and throughput per method (means over runs)."""
    rows = []
    for config in grid.configs(model):
        ok = grid.ok(model, config)
        if not ok:
            continue
        g = lambda f: grid.field_mean(model, config, f)  # noqa: E731
        ranks = {r.get("rank_max") for r in ok if r.get("rank_max") is not None}
        steps = _mean([r.get("steps") for r in ok]) or 1
        rows.append([f"`{config}`", _count(g("trainable_params")), _count(g("changed_params")),
                     "-" if not ranks else str(max(ranks)), _pct(g("trainable_pct")), f"{g('peak_memory_mb') or 0:.0f}",
                     f"{(g('train_time_s') or 0) / steps:.3f}", f"{g('tokens_per_s') or 0:.0f}"])
    return _table(["Method", "trainable", "changed", "max rank ΔW", "TP %", "peak MB", "s / step", "tokens/s"], rows)


def problems(records: list[Record]) -> str:
    """The runs that did not apply and the runs that failed, one line each."""
    lines = []
    for status, title in (("not_applicable", "Not applicable (declared needs, NotApplicableError)"),
                          ("failed", "Failed")):
        hits = [r for r in records if r.get("status") == status]
        if hits:
            lines.append(f"**{title}** ({len(hits)}):\n")
            lines += [f"- `{r['config']}` on {r['model']} / {r['task']} / seed {r['seed']}: "
                      f"{(r.get('error') or '').strip().splitlines()[0] if r.get('error') else ''}" for r in hits]
            lines.append("")
    return "\n".join(lines) if lines else "Every run succeeded."


def render(records: list[Record], meta: dict[str, Any], plots: list[str]) -> str:
    """The whole ``report.md``."""
    grid = Grid(records)
    b = meta.get("budget", {})
    counts = {s: sum(r.get("status") == s for r in records) for s in ("ok", "not_applicable", "failed")}
    parts = [
        f"# peftlab bench methods: {meta.get('preset', '')}",
        f"{meta.get('note', '')}\n",
        f"Command: `peftlab bench methods {' '.join(meta.get('argv') or [])}`  ",
        f"Budget, the same for every run: {b.get('steps')} steps, batch {b.get('batch_size')}, max length "
        f"{b.get('max_length')}, train examples ≤ {b.get('train_limit') or 'all'}, eval examples ≤ "
        f"{b.get('eval_limit') or 'all'}, warmup {b.get('warmup_ratio')}, lr = each method's `default_lr` "
        f"(full fine-tuning {b.get('full_lr')}), default configs, task head trained (`modules_to_save`), device "
        f"{b.get('device')}.  ",
        f"Runs: {len(records)} ({counts['ok']} ok, {counts['not_applicable']} not applicable, {counts['failed']} "
        f"failed); seeds {sorted({r['seed'] for r in records})}; machine {meta.get('machine', {}).get('cpus')} CPUs; "
        f"versions {', '.join(f'{k} {v}' for k, v in (meta.get('versions') or {}).items())}; written "
        f"{meta.get('written', '')}.",
    ]
    if not records:  # --compare-only: the comparison's section follows
        return "\n".join(parts[:-1]) + "\n"
    for model in grid.models:
        parts += [f"\n## {model}: metrics after training (x 100; Table III's shape)\n", table_iii(grid, model)]
    for model in [m for m in grid.models if "smollm2" in m.lower()]:
        parts += [f"\n## {model}: peak training memory (Table VII's shape)\n", table_vii(grid, model)]
    for model in grid.models:
        parts += [f"\n## {model}: parameters, memory and time\n", cost_table(grid, model)]
    parts += ["\n## Runs that did not apply or failed\n", problems(records)]
    if plots:
        parts.append("\n## Plots\n")
        parts += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    parts.append("\nMemory: peak above the loaded model during training (CPU: resident set high-water mark; "
                 "CUDA: allocator peak). TP % = trainable / parameters of the base model with its task head.")
    return "\n".join(parts) + "\n"


def _pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points no other point beats with fewer (or as many) parameters and a higher metric."""
    front, best = [], -math.inf
    for x, y, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y, name))
            best = y
    return front


def plot(records: list[Record], out: Path) -> list[str]:
    """Write the three plots into ``out``; returns their paths ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    grid = Grid(records)
    n = len(grid.models)
    if not n:
        return []
    written = []
    fig, axes = plt.subplots(1, n, figsize=(7 * n, 5.5), squeeze=False)
    for ax, model in zip(axes[0], grid.models):
        points = [(grid.field_mean(model, c, "trainable_params"), grid.average(model, c), c) for c in grid.configs(model)]
        points = [(x, 100 * y, c) for x, y, c in points if x and y is not None]
        front = _pareto(points)
        ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", s=18)
        ax.plot([p[0] for p in front], [p[1] for p in front], color="tab:red", drawstyle="steps-post", lw=1)
        ax.scatter([p[0] for p in front], [p[1] for p in front], facecolors="none", edgecolors="tab:red", s=80,
                   label="Pareto front")
        for x, y, c in points:
            ax.annotate(c, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("average metric after training (x 100)")
        ax.set_title(f"{model}: metric vs trainable parameters")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out / PLOTS[0], plt))

    fig, axes = plt.subplots(1, n, figsize=(7 * n, 0.28 * max(len(grid.configs(m)) for m in grid.models) + 1.5),
                             squeeze=False)
    for ax, model in zip(axes[0], grid.models):
        bars = [(c, grid.field_mean(model, c, "peak_memory_mb")) for c in grid.configs(model)]
        bars = sorted([(c, v) for c, v in bars if v is not None], key=lambda b: b[1])
        ax.barh([c for c, _ in bars], [v for _, v in bars],
                color=["tab:gray" if c == FULL else "tab:blue" for c, _ in bars])
        ax.set_xlabel("peak memory above the loaded model (MB)")
        ax.set_title(f"{model}: peak training memory")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    written.append(_save(fig, out / PLOTS[1], plt))

    pairs = [(m, t) for m in grid.models for t in grid.tasks if any(grid.ok(m, c, t) for c in grid.configs(m))]
    cols = min(3, max(1, len(pairs)))
    rows = max(1, math.ceil(len(pairs) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for i, (model, task) in enumerate(pairs):
        ax = axes[i // cols][i % cols]
        for j, config in enumerate(grid.configs(model)):
            curves = [r.get("loss_curve") or [] for r in grid.ok(model, config, task)]
            if not curves or not curves[0]:
                continue
            length = min(len(c) for c in curves)
            mean = [statistics.fmean(c[k] for c in curves) for k in range(length)]
            ax.plot(range(1, length + 1), mean, lw=1.6 if config == FULL else 0.9, color=cmap(j % 20),
                    linestyle="-" if j < 20 else "--", label=config)
        ax.set_title(f"{model} / {task}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=5, ncol=2)
    for k in range(len(pairs), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.tight_layout()
    written.append(_save(fig, out / PLOTS[2], plt))
    return written


def _save(fig: Any, path: Path, plt: Any) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_report(out: Path, records: list[Record], meta: dict[str, Any]) -> dict[str, Any]:
    """Write the plots and ``report.md`` into ``out``; returns ``{"report": path, "plots": [paths]}``.
    ``--compare-peft`` records get their own section and plot (:mod:`peftlab.bench.compare_report`)."""
    from peftlab.bench.compare_report import compare_plot, compare_records, compare_section

    compared = compare_records(records)
    runs = [r for r in records if r.get("job_kind") != COMPARE]
    plots = plot(runs, out)
    path = out / "report.md"
    path.write_text(render(runs, meta, plots) + compare_section(compared))
    extra = compare_plot(compared, out)
    return {"report": str(path), "plots": plots + ([extra] if extra else [])}
