"""How long the engine takes to register many LoRA adapters (``Engine.load_adapter`` on PEFT-format
directories of one config): the first one is built with the library's loading code, which records
the config's keys, shapes and scalings; the others are checked against that record and read
without building deltas (``serve/adapters.py``, ``LoraTemplate``).

    python -m peftlab.serve.bench.registration --adapters 1000 --adapter-dir /tmp/adapters \\
        --out docs/results/bench_serve/registration.json

Prints a table, writes the JSON (every adapter's wall and CPU milliseconds) and a plot next to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from peftlab.serve.bench.adapters import METHOD, make_adapters
from peftlab.serve.bench.cells import adapter_names, load_model


def register_all(model_name: str, dirs: list[str], threads: int = 1) -> dict[str, Any]:
    """Register every directory in a fresh engine over ``model_name``; per adapter, the wall and
    process-CPU milliseconds of ``load_adapter``, and the engine's host memory afterwards."""
    from peftlab.serve.engine import Engine

    torch.set_num_threads(threads)
    model, tokenizer = load_model(model_name, "cpu")
    root = str(Path(dirs[0]).parent)
    engine = Engine(model, tokenizer, allowed_roots=[root])
    wall, cpu = [], []
    for name, path in tqdm(list(zip(adapter_names(len(dirs)), dirs)), desc="registering", unit="adapter"):
        w0, c0 = time.perf_counter(), time.process_time()
        engine.load_adapter(name, path)
        wall.append(1000 * (time.perf_counter() - w0))
        cpu.append(1000 * (time.process_time() - c0))
    stats = engine.stats()
    engine.close()
    return {"wall_ms": wall, "cpu_ms": cpu, "registered": stats["registered_adapters"],
            "host_adapter_bytes": stats["host_adapter_bytes"]}


def summary(result: dict[str, Any]) -> dict[str, float]:
    """Totals, the first adapter's time and the others' median and 90th percentile, wall and CPU."""
    out: dict[str, float] = {}
    for kind in ("wall", "cpu"):
        ms = result[f"{kind}_ms"]
        rest = sorted(ms[1:]) or [0.0]
        out[f"{kind}_total_s"] = sum(ms) / 1000
        out[f"{kind}_first_ms"] = ms[0]
        out[f"{kind}_median_ms"] = statistics.median(rest)
        out[f"{kind}_p90_ms"] = rest[int(0.9 * (len(rest) - 1))]
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Cumulative registration time against the number of adapters registered (wall and CPU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kind in ("wall", "cpu"):
        total, ys = 0.0, []
        for ms in result[f"{kind}_ms"]:
            total += ms / 1000
            ys.append(total)
        ax.plot(range(1, len(ys) + 1), ys, label=f"{kind} time")
    ax.set_xlabel("adapters registered")
    ax.set_ylabel("seconds (cumulative)")
    ax.set_title(f"Engine.load_adapter: {len(result['wall_ms'])} LoRA adapters, {result['model']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Make (or reuse) the adapters, register them, print the table, write the JSON and the plot."""
    p = argparse.ArgumentParser(prog="python -m peftlab.serve.bench.registration", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="zoo name (smollm2)")
    p.add_argument("--adapters", type=int, default=1000, help="adapters to register (1000)")
    p.add_argument("--adapter-dir", type=Path, default=Path("runs/bench_serve_adapters"),
                   help="where the adapters are made, or reused when made before with the same model and method")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    p.add_argument("--out", type=Path, default=Path("runs/registration.json"), help="the JSON report")
    args = p.parse_args(argv)
    if args.adapters < 1 or args.threads < 1:
        p.error(f"--adapters and --threads must be >= 1, got {args.adapters} and {args.threads}")
    dirs = make_adapters(args.model, args.adapters, args.adapter_dir)
    result = {"model": args.model, "method": METHOD, "adapters": args.adapters, "threads": args.threads,
              **register_all(args.model, dirs, args.threads)}
    result["summary"] = summary(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    s = result["summary"]
    print(f"{args.adapters} adapters ({METHOD}) on {args.model}: {result['registered']} registered, "
          f"{result['host_adapter_bytes'] / 2**20:.0f} MiB in host memory")
    print("| measure | total s | first adapter ms | others: median ms | others: p90 ms |")
    print("|---|---|---|---|---|")
    for kind in ("wall", "cpu"):
        print(f"| {kind} | {s[f'{kind}_total_s']:.1f} | {s[f'{kind}_first_ms']:.0f} | {s[f'{kind}_median_ms']:.1f} "
              f"| {s[f'{kind}_p90_ms']:.1f} |")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
