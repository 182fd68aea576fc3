"""The jobs of ``peftlab bench lora``: one training row, the inference rows, the mixed-batch rows.

Each job is a JSON-able dict (``kind``, ``model``, ``threads``, ``steps``, ``seed``, ``device``,
``quick``...) and returns a JSON-able dict. :mod:`peftlab.bench.suite` runs them, each in a fresh
subprocess (:func:`peftlab.bench.measure.run_isolated`) or, for tiny test models, in-process.

* ``train``: a forward + backward + AdamW step on the training batch, for one row and one library;
  time per step and peak memory above the loaded model. ``train_pair`` (``--interleave``): one row
  with both libraries in one process, their steps timed alternately, peak memory per step.
* ``infer``: a no-grad prefill of the training batch shape by the base, and by LoRA q,v unmerged and
  merged in both libraries; the calls are interleaved round by round so that drift in the machine's
  load hits every variant alike.
* ``mixed``: 32 rows, each routed to one of 1, 8 or 32 LoRA adapters, as one mixed batch (peftlab
  and PEFT), as a loop of ``set_adapter`` over the groups (peftlab), and the base alone; a prefill,
  and for decoders one decode step over the prefill's key/value cache (a fresh copy per call).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from peftlab.bench import libs
from peftlab.bench.measure import MB, interleaved, measure_pair, median, timed
from peftlab.bench.models import SPECS, ModelSpec, load_model, logits, make_batch, prefill_kwargs
from peftlab.core.model_calls import cache_argument
from peftlab.train.memory import PeakMemory

#: Rows of the training section: reference rows (no adapter) and the adapter variants.
REFERENCE_ROWS = {"base_forward": "base forward only", "full_ft": "full fine-tuning"}
TRAIN_ROWS = [*REFERENCE_ROWS, *libs.VARIANTS]
ADAPTER_COUNTS = (1, 8, 32)
LR = 1e-4


def _setup(job: dict[str, Any]) -> tuple[ModelSpec, torch.device]:
    torch.set_num_threads(int(job["threads"]))
    torch.manual_seed(int(job["seed"]))
    return SPECS[job["model"]], torch.device(job["device"])


def _summary(times: dict[str, list[float]]) -> dict[str, Any]:
    return {"time_s": median(times["wall"]), "cpu_s": median(times["cpu"]), "times_s": times["wall"]}


# -- 1. training ------------------------------------------------------------------------------------
def train_job(job: dict[str, Any]) -> dict[str, Any]:
    """One training row (``job["row"]`` in :data:`TRAIN_ROWS`) with one library (``job["lib"]``)."""
    spec, device = _setup(job)
    model = load_model(spec, device)
    train_shape, _ = spec.shapes(job["quick"])
    batch = make_batch(spec, model, train_shape, job["seed"], labels=True, device=device)
    with PeakMemory(device) as memory:  # baseline: the loaded model and the batch
        step, n_trainable = _train_step(job, spec, model, batch)
        times = timed(step, job["steps"], device)
    return {**_summary(times), "peak_mb": memory.peak_bytes / MB, "memory_method": memory.method,
            "baseline_mb": memory.baseline_bytes / MB, "trainable": n_trainable, "shape": list(train_shape)}


def train_pair_job(job: dict[str, Any]) -> dict[str, Any]:
    """One adapter row (``job["row"]``) with both libraries in this one process (``--interleave``):
    a model copy each, the same batch; peak memory per library's step, then the two libraries' steps
    timed alternately (:func:`~peftlab.bench.measure.measure_pair`), so that the machine's load
    hits both alike. Returns ``{"rows": [one row per library]}``."""
    spec, device = _setup(job)
    train_shape, _ = spec.shapes(job["quick"])
    steps, trainable = {}, {}
    for lib in libs.LIBS:
        model = load_model(spec, device)
        batch = make_batch(spec, model, train_shape, job["seed"], labels=True, device=device)
        steps[lib], trainable[lib] = _train_step({**job, "lib": lib}, spec, model, batch)
    times, peaks, method = measure_pair(steps, job["steps"], device)
    return {"rows": [{"lib": lib, **_summary(times[lib]), "peak_mb": peaks[lib], "memory_method": method,
                      "trainable": trainable[lib], "shape": list(train_shape), "interleaved": True} for lib in libs.LIBS]}


def _train_step(job: dict[str, Any], spec: ModelSpec, model: nn.Module, batch: dict[str, Any]) -> tuple[Callable[[], None], int]:
    """The step function of one training row and its number of trainable parameters."""
    row = job["row"]
    if row == "base_forward":
        model.train()

        def step() -> None:
            with torch.no_grad():
                model(**batch).loss

        n_trainable = 0
    else:
        if row == "full_ft":
            net: nn.Module = model
            for p in net.parameters():
                p.requires_grad_(True)
        else:
            torch.manual_seed(int(job["seed"]))
            net = libs.wrap(job["lib"], model, spec, libs.VARIANTS[row])
        params = libs.trainable(net)
        n_trainable = sum(p.numel() for p in params)
        step = libs.train_step(net, params, LR, lambda: net(**batch).loss)
    return step, n_trainable


# -- shared by inference and mixed batches ------------------------------------------------------------
def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def call() -> Any:
        with torch.no_grad():
            return logits(fn())

    return call


# -- 2. inference -----------------------------------------------------------------------------------
def infer_job(job: dict[str, Any]) -> dict[str, Any]:
    """Base, and LoRA q,v (random nonzero B) unmerged and merged with each library, on one batch."""
    spec, device = _setup(job)
    base = load_model(spec, device)
    train_shape, _ = spec.shapes(job["quick"])
    batch = make_batch(spec, base, train_shape, job["seed"], labels=False, device=device)
    kw = prefill_kwargs(spec)
    variant = libs.VARIANTS["lora_qv"]
    wrapped = {f"{lib}#{state}": libs.wrap(lib, copy.deepcopy(base), spec, variant, with_head=False).eval()
               for lib in libs.LIBS for state in ("unmerged", "merged")}
    libs.randomize_same(wrapped, ["default"], job["seed"])
    wrapped["peftlab#merged"].merge()
    wrapped["peft#merged"].merge_adapter()
    cases = {"torch#base": lambda: _no_grad(lambda: base(**batch, **kw))}
    for key, net in wrapped.items():
        cases[key] = lambda net=net: _no_grad(lambda: net(**batch, **kw))
    times, outs = interleaved(cases, job["steps"], device)
    rows = [{"lib": key.split("#")[0], "row": key.split("#")[1], **_summary(t)} for key, t in times.items()]
    checks = {
        "peftlab_vs_peft_unmerged": _max_diff(outs["peftlab#unmerged"], outs["peft#unmerged"]),
        "peftlab_merged_vs_unmerged": _max_diff(outs["peftlab#merged"], outs["peftlab#unmerged"]),
        "peft_merged_vs_unmerged": _max_diff(outs["peft#merged"], outs["peft#unmerged"]),
        "adapter_vs_base": _max_diff(outs["peftlab#unmerged"], outs["torch#base"]),
    }
    return {"rows": rows, "checks": checks, "shape": list(train_shape)}


# -- 3. mixed batches -------------------------------------------------------------------------------
def _groups(names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    rows: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        rows.setdefault(n, []).append(i)
    return {n: torch.tensor(r, device=device) for n, r in rows.items()}


def _select(batch: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v.index_select(0, rows) for k, v in batch.items()}


def _switching(pm: nn.Module, groups: dict[str, torch.Tensor], run: Callable[[str, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """One forward per adapter group (``set_adapter`` before each), scattered back into batch order."""
    result = None
    for name, rows in groups.items():
        pm.set_adapter(name)
        out = logits(run(name, rows))
        if result is None:
            total = int(sum(r.numel() for r in groups.values()))
            result = out.new_empty((total, *out.shape[1:]))
        result.index_copy_(0, rows, out)
    return result


def mixed_job(job: dict[str, Any]) -> dict[str, Any]:
    """Mixed batches of 1, 8 and 32 LoRA adapters over the mixed shape's rows (prefill, decode)."""
    spec, device = _setup(job)
    base = load_model(spec, device)
    _, (rows, tokens) = spec.shapes(job["quick"])
    variant = libs.VARIANTS["lora_qv"]
    names_all = [f"a{i}" for i in range(max(ADAPTER_COUNTS))]
    nets: dict[str, nn.Module] = {}
    for lib in libs.LIBS:
        net = libs.wrap(lib, copy.deepcopy(base), spec, variant, adapter_name=names_all[0], with_head=False)
        for name in names_all[1:]:
            libs.add_adapter(lib, net, spec, variant, name)
        nets[lib] = net.eval()
    libs.randomize_same(nets, names_all, job["seed"])
    pl, pf = nets["peftlab"], nets["peft"]
    batch = make_batch(spec, base, (rows, tokens), job["seed"], labels=False, device=device)
    routes = {n: [names_all[i % n] for i in range(rows)] for n in ADAPTER_COUNTS}
    groups = {n: _groups(r, device) for n, r in routes.items()}
    steps = job["steps"]
    result: dict[str, Any] = {"rows": [], "checks": {}, "shape": [rows, tokens]}

    # prefill
    kw = prefill_kwargs(spec)
    cases: dict[str, Callable[[], Callable[[], Any]]] = {"base": lambda: _no_grad(lambda: base(**batch, **kw))}
    for n in ADAPTER_COUNTS:
        cases[f"peftlab#{n}"] = lambda n=n: _no_grad(lambda: pl(**batch, adapter_names=routes[n], **kw))
        cases[f"peft#{n}"] = lambda n=n: _no_grad(lambda: pf(**batch, adapter_names=routes[n], **kw))
        cases[f"switch#{n}"] = lambda n=n: _no_grad(
            lambda: _switching(pl, groups[n], lambda _, r: pl(**_select(batch, r), **kw)))
    times, outs = interleaved(cases, steps, device)
    _collect(result, "prefill", times, outs, rows * tokens)

    if spec.decoder:
        times, outs = _decode(base, pl, pf, batch, routes, groups, spec, steps * job.get("decode_factor", 4), device)
        _collect(result, "decode", times, outs, rows)
    return result


def _decode(base, pl, pf, batch, routes, groups, spec, steps, device):
    """Time one decode step (one new token per row) over the prefill's cache, copied for every call."""
    kw = prefill_kwargs(spec, use_cache=True)
    rows = batch["input_ids"].shape[0]
    gen = torch.Generator().manual_seed(1)
    step_ids = torch.randint(3, base.config.vocab_size, (rows, 1), generator=gen).to(device)
    step_mask = torch.ones(rows, batch["attention_mask"].shape[1] + 1, dtype=batch["attention_mask"].dtype, device=device)
    step = {"input_ids": step_ids, "attention_mask": step_mask}
    arg = cache_argument(base)  # the model's own name for its cache, in its outputs and inputs alike
    with torch.no_grad():
        caches: dict[str, Any] = {"base": getattr(base(**batch, **kw), arg)}
        for n, names in routes.items():
            caches[f"peftlab#{n}"] = getattr(pl(**batch, adapter_names=names, **kw), arg)
            caches[f"peft#{n}"] = getattr(pf(**batch, adapter_names=names, **kw), arg)
            per_group = {}
            for name, r in groups[n].items():
                pl.set_adapter(name)
                per_group[name] = getattr(pl(**_select(batch, r), **kw), arg)
            caches[f"switch#{n}"] = per_group

    def case(key: str, call: Callable[[Any], Any]) -> Callable[[], Callable[[], Any]]:
        def prepare() -> Callable[[], Any]:
            cache = copy.deepcopy(caches[key])  # untimed: every timed call starts from the prefill's cache
            return _no_grad(lambda: call(cache))

        return prepare

    cases = {"base": case("base", lambda c: base(**step, **{arg: c}, use_cache=True))}
    for n in routes:
        cases[f"peftlab#{n}"] = case(f"peftlab#{n}", lambda c, n=n: pl(**step, **{arg: c}, adapter_names=routes[n], use_cache=True))
        cases[f"peft#{n}"] = case(f"peft#{n}", lambda c, n=n: pf(**step, **{arg: c}, adapter_names=routes[n], use_cache=True))
        cases[f"switch#{n}"] = case(f"switch#{n}", lambda c, n=n: _switching(
            pl, groups[n], lambda name, r: pl(**_select(step, r), **{arg: c[name]}, use_cache=True)))
    return interleaved(cases, steps, device)


def _collect(result: dict[str, Any], phase: str, times: dict, outs: dict, tokens: int) -> None:
    """Rows with throughput relative to the base and to PEFT's mixed batch, and the cross-checks."""
    base_time = median(times["base"]["wall"])
    result["rows"].append({"phase": phase, "variant": "base", "lib": "torch", "adapters": 0, **_summary(times["base"]),
                           "tokens_per_s": tokens / base_time if base_time else 0.0, "vs_base": 1.0})
    for n in ADAPTER_COUNTS:
        peft_time = median(times[f"peft#{n}"]["wall"])
        for variant, lib in (("mixed", "peftlab"), ("mixed", "peft"), ("switch", "peftlab")):
            key = f"{'switch' if variant == 'switch' else lib}#{n}"
            t = median(times[key]["wall"])
            result["rows"].append({
                "phase": phase, "variant": variant, "lib": lib, "adapters": n, **_summary(times[key]),
                "tokens_per_s": tokens / t if t else 0.0,
                "vs_base": base_time / t if t else 0.0,
                "vs_peft": peft_time / t if t else 0.0,
            })
        result["checks"][f"{phase}_{n}_peftlab_vs_peft"] = _max_diff(outs[f"peftlab#{n}"], outs[f"peft#{n}"])
        result["checks"][f"{phase}_{n}_switch_vs_mixed"] = _max_diff(outs[f"switch#{n}"], outs[f"peftlab#{n}"])
    result["checks"][f"{phase}_adapters_change_output"] = _max_diff(outs[f"peftlab#{ADAPTER_COUNTS[-1]}"], outs["base"])


JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"train": train_job, "train_pair": train_pair_job,
                                                               "infer": infer_job, "mixed": mixed_job}
