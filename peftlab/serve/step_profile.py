"""How much one decode step of the engine costs with many adapters, against the base model alone.

``python -m peftlab.serve.step_profile --model smollm2 --adapters 32 --rows 32`` writes N random
LoRA adapters (rank ``--rank`` on ``--targets``, nonzero B), starts ``--rows`` requests in one engine
(row i uses adapter i mod N), and then times, round by round on the same batch and cache:

* ``base``: the decode step with no adapter on any row (the base model through the same engine);
* ``adapters``: the same step with every row on its adapter, the batch's composition rotated at
  every step (so nothing per composition can be reused);
* ``merged``: every row on one adapter, merged into the base (dLoRA's case);

and the time to move an adapter from host memory into a bank slot (``host_to_device_ms``).
Prints a table and writes JSON (``--out``). Wall-clock and process-CPU seconds are both kept (the
CPU time is less sensitive to other processes on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import peftlab
from peftlab.bench.measure import interleaved, median

from .engine import Engine, GenerationRequest


def make_adapters(model: torch.nn.Module, root: Path, n: int, spec: str, seed: int = 0) -> list[Path]:
    """Write ``n`` LoRA adapters of ``spec`` with random nonzero weights under ``root``."""
    gen = torch.Generator().manual_seed(seed)
    pm = peftlab.apply(model, spec)
    paths = []
    for i in range(n):
        with torch.no_grad():
            for p in pm.adapter_modules["default"].parameters():
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        paths.append(root / f"a{i:04d}")
        pm.save(paths[-1])
    pm.unload()
    return paths


def profile(model_name: str = "smollm2", adapters: int = 32, rows: int = 32, rank: int = 8,
            targets: str = "q_proj|v_proj", steps: int = 10, prompt_tokens: int = 64) -> dict[str, Any]:
    """Run the measurement of the module docstring and return its numbers."""
    from peftlab.zoo import load

    model, tok = load(model_name, task="causal-lm")
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(model, Path(tmp), adapters, f"lora[r={rank},alpha={2 * rank},targets={targets}]")
        engine = Engine(model, tok, max_batch=rows, device_adapters=adapters + 1, allowed_roots=[tmp],
                        merge_policy=False)
        for i, p in enumerate(paths):
            engine.load_adapter(f"a{i:04d}", p)
        engine.load_adapter("spare", paths[0])  # no request uses it: moved in and out for host_to_device_ms
        prompt = [(7 * i) % 1000 + 100 for i in range(prompt_tokens)]
        for i in range(rows):
            engine.submit(GenerationRequest(prompt, adapter=f"a{i % adapters:04d}", max_tokens=10**6))
        while len(engine.rows) < rows:
            engine._step()
        lengths = torch.tensor([r.length for r in engine.rows], device=engine.device)
        last = torch.tensor([r.last for r in engine.rows], device=engine.device)
        slots = [r.slot for r in engine.rows]
        turn = [0]
        top = max(set(slots), key=slots.count)

        def step(slot_list_of: Any, merged: bool = False):
            def prepare():  # untimed: choose the rows' slots, merge or unmerge
                turn[0] += 1
                if merged:
                    engine.bank.merge(top)
                else:
                    engine.bank.unmerge()
                chosen = slot_list_of(turn[0])
                return lambda: engine._decode_logits(last, lengths, chosen, None)
            return prepare

        rotate = (lambda k: slots[k % rows:] + slots[: k % rows])
        cases = {"base": step(lambda k: [0] * rows), "adapters": step(rotate),
                 "merged": step(lambda k: [top] * rows, merged=True)}
        with torch.no_grad():
            times, _ = interleaved(cases, steps, engine.device, warmup=2)
        engine.bank.unmerge()
        promote = _host_to_device_ms(engine, "spare")
        engine.stop()
        engine.close()
    result: dict[str, Any] = {"model": model_name, "n_adapters": adapters, "rows": rows, "rank": rank, "targets": targets,
                              "prompt_tokens": prompt_tokens, "threads": torch.get_num_threads(), "steps": steps}
    for key, t in times.items():
        result[key] = {"wall_ms": 1000 * median(t["wall"]), "cpu_ms": 1000 * median(t["cpu"]),
                       "min_wall_ms": 1000 * min(t["wall"]), "min_cpu_ms": 1000 * min(t["cpu"]),
                       "tokens_per_s": rows / median(t["wall"])}
    for kind in ("wall_ms", "cpu_ms", "min_wall_ms", "min_cpu_ms"):  # throughput ratios (time of base / time)
        result[f"adapters_vs_base_{kind[:-3]}"] = result["base"][kind] / result["adapters"][kind]
        result[f"merged_vs_base_{kind[:-3]}"] = result["base"][kind] / result["merged"][kind]
    result["host_to_device_ms"] = promote
    return result


def _host_to_device_ms(engine: Engine, name: str, repeats: int = 20) -> dict[str, float]:
    """Median time to bring one adapter from host memory into a bank slot (evicting it in between):
    wall and process-CPU milliseconds (the CPU time leaves out other processes of a shared machine)."""
    cache = engine.adapters
    entry = cache.get(name)
    wall, cpu = [], []
    for _ in range(repeats):
        if entry.on_device and entry.running == 0:
            cache._evict(entry)
        t0, c0 = time.perf_counter(), time.process_time()
        cache.ensure_device(entry)
        wall.append(1000 * (time.perf_counter() - t0))
        cpu.append(1000 * (time.process_time() - c0))
    return {"wall_ms": median(wall), "cpu_ms": median(cpu)}


def main(argv: list[str] | None = None) -> int:
    """The command line of the module docstring."""
    ap = argparse.ArgumentParser(prog="python -m peftlab.serve.step_profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj|v_proj")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = profile(args.model, args.adapters, args.rows, args.rank, args.targets, args.steps, args.prompt_tokens)
    print(f"{res['model']}: one decode step, {res['rows']} rows, {res['n_adapters']} LoRA r{res['rank']} "
          f"({res['targets']}), {res['threads']} threads")
    print(f"{'case':<10} {'wall ms':>9} {'cpu ms':>9} {'min cpu ms':>11} {'tokens/s':>9}")
    for key in ("base", "adapters", "merged"):
        r = res[key]
        print(f"{key:<10} {r['wall_ms']:>9.1f} {r['cpu_ms']:>9.1f} {r['min_cpu_ms']:>11.1f} {r['tokens_per_s']:>9.1f}")
    print(f"adapters / base throughput: {res['adapters_vs_base_wall']:.3f} (wall), {res['adapters_vs_base_cpu']:.3f} (cpu), "
          f"{res['adapters_vs_base_min_cpu']:.3f} (min cpu); "
          f"host -> device: {res['host_to_device_ms']['wall_ms']:.3f} ms wall, {res['host_to_device_ms']['cpu_ms']:.3f} ms cpu")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
