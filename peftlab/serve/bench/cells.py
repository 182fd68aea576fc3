"""One cell of the load benchmark: one system serving one trace with n adapters, measured.

Systems: ``base`` (the engine, every request to the base model: the reference), ``engine`` (the
engine with n adapters), ``peft_switch`` and ``peft_mixed`` (Hugging Face PEFT,
:mod:`peftlab.serve.bench.baselines`). A cell is a JSON-able job and returns a JSON-able result;
:mod:`peftlab.serve.bench.worker` runs it in a fresh process so that its peak memory is its own.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from peftlab.bench.measure import MB, touch_parameters
from peftlab.serve.bench.driver import MemorySampler, records_as_dicts, run_trace, summarize
from peftlab.serve.bench.workload import TraceRequest
from peftlab.train.memory import PeakMemory

SYSTEMS = ("base", "engine", "peft_switch", "peft_mixed")
LABELS = {"base": "base model alone (engine)", "engine": "peftlab engine", "peft_switch": "PEFT, set_adapter per request",
          "peft_mixed": "PEFT mixed batch (adapter_names)"}
#: The tiny model of the smoke runs: a tiny random Llama (ids below its vocabulary of 128) that
#: decodes its ids with SmolLM2's tokenizer.
TINY = "tiny"


def load_tokenizer(name: str) -> Any:
    """The tokenizer of a zoo name or model directory (``"tiny"`` and ``"smollm2"``: SmolLM2's)."""
    from peftlab.zoo.tasks import load_tokenizer_dir

    if name in (TINY, "smollm2"):
        from peftlab.zoo.smollm2 import ensure_cache

        return load_tokenizer_dir(ensure_cache()[0])
    from peftlab import zoo

    if name in zoo.ZOO_NAMES:
        return zoo.load(name, task="causal-lm")[1]
    return load_tokenizer_dir(name)


def load_model(name: str, device: str) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a zoo name or directory through :func:`peftlab.zoo.load` (causal LM),
    or ``"tiny"``; eval mode, every weight resident."""
    from peftlab import zoo

    if name == TINY:
        model, tokenizer = zoo.tiny_model("llama", task="causal-lm", seed=0), load_tokenizer(name)
    else:
        model, tokenizer = zoo.load(name, task="causal-lm")
    model = model.to(device).eval()
    touch_parameters(model)
    return model, tokenizer


def adapter_names(n: int) -> list[str]:
    """The benchmark's adapter names: ``a0000``, ``a0001``, ..."""
    return [f"a{i:04d}" for i in range(n)]


def build_system(job: dict[str, Any], model: Any, tokenizer: Any) -> Any:
    """The system of ``job`` over ``model`` with the job's first n adapters loaded (not started)."""
    system, names = job["system"], adapter_names(job["n_adapters"])
    dirs = dict(zip(names, job["adapter_dirs"]))
    limits = {"max_batch": job["max_batch"], "max_queue": job["max_queue"]}
    if system in ("base", "engine"):
        from peftlab.serve.engine import Engine

        engine = Engine(model, tokenizer, device=job["device"], allowed_roots=[job["adapter_root"]], **limits,
                        **job.get("engine_options", {}))
        for name, path in dirs.items():
            engine.load_adapter(name, path)
        return engine
    from peftlab.serve.bench.baselines import PeftMixedBatch, PeftSwitching, load_peft

    kind = {"peft_switch": PeftSwitching, "peft_mixed": PeftMixedBatch}[system]
    return kind(load_peft(model, dirs), tokenizer, names, **limits)


def _memory_drift(samples: list[tuple[float, float]], until_s: float | None = None) -> dict[str, Any]:
    """A soak's memory: the RSS samples, and the change over the second half of the loaded run, the
    samples up to ``until_s`` (the last completion: after it the idle engine frees its key/value
    cache, which is no drift under load): least-squares slope in MiB per minute, and last minus
    middle in MiB."""
    loaded = [s for s in samples if until_s is None or s[0] <= until_s]
    if len(loaded) < 4:
        return {"memory_samples": samples, "memory_slope_mb_per_min": None, "memory_drift_mb": None}
    half = [s for s in loaded if s[0] >= loaded[-1][0] / 2]
    ts, ms = [t for t, _ in half], [m for _, m in half]
    t_mean, m_mean = sum(ts) / len(ts), sum(ms) / len(ms)
    var = sum((t - t_mean) ** 2 for t in ts)
    slope = sum((t - t_mean) * (m - m_mean) for t, m in zip(ts, ms)) / var if var else 0.0
    return {"memory_samples": samples, "memory_slope_mb_per_min": slope * 60, "memory_drift_mb": ms[-1] - ms[0],
            "memory_start_mb": samples[0][1], "memory_end_mb": loaded[-1][1], "memory_after_idle_mb": samples[-1][1]}


def run_cell(job: dict[str, Any]) -> dict[str, Any]:
    """Load the model and the system, warm it up on the trace's first requests, replay the trace,
    and return the summary (throughput, latency percentiles, deadline misses, failures, memory)."""
    torch.set_num_threads(int(job["threads"]))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tokenizer = load_model(job["model"], job["device"])
    t1 = time.perf_counter()
    system = build_system(job, model, tokenizer)
    t2 = time.perf_counter()
    trace = [TraceRequest(**r) for r in job["trace"]]
    names = adapter_names(job["n_adapters"])
    with system:
        warmup = [TraceRequest(0.0, r.adapter, r.prompt_ids, min(r.max_tokens, 4)) for r in trace[: job["warmup"]]]
        run_trace(system, warmup, names, slo_s=job["slo_s"])
        sampler = MemorySampler(job.get("sample_every_s", 1.0))
        with PeakMemory(job["device"]) as peak, sampler:
            cpu0 = time.process_time()
            records, span = run_trace(system, trace, names, slo_s=job["slo_s"], timeout_s=job["timeout_s"])
            cpu_s = time.process_time() - cpu0
        stats = system.stats()
    summary = summarize(records, span)
    result = {
        "system": job["system"], "label": LABELS[job["system"]], "n_adapters": job["n_adapters"], **summary,
        "cpu_s": cpu_s, "tokens_per_cpu_s": summary["generated_tokens"] / cpu_s if cpu_s > 0 else 0.0,
        "peak_mb": (peak.baseline_bytes + peak.peak_bytes) / MB, "peak_above_loaded_mb": peak.peak_bytes / MB,
        "memory_method": peak.method, "model_load_s": t1 - t0, "adapter_load_s": t2 - t1,
        "engine_stats": {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool, type(None)))},
    }
    if job.get("soak"):
        result.update(_memory_drift(sampler.samples, until_s=span))
    if job.get("keep_records"):
        result["records"] = records_as_dicts(records)
    return result
