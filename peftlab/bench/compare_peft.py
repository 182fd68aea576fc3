"""``peftlab bench methods --compare-peft``: our training step beside Hugging Face PEFT's, per method.

For every benchmarked method that PEFT also has (its registry entry declares ``peft=PeftFormat(...)``,
so a method registered later is compared without an edit here), one *compare job* per model:

1. one fresh process loads the task's first training batch (the benchmark's batch size and max
   length) and two fresh copies of the model;
2. ours: ``peftlab.apply(model, method)`` with the method's default config and the task head in
   ``modules_to_save``, exactly as a benchmark run (``begin_training`` with the budget's steps);
   PEFT's twin: our adapter saved in PEFT's format, rebuilt by ``peft.get_peft_model`` from the
   config PEFT reads back and loaded with our tensors, so both start from the same weights; a tensor
   we keep frozen (LoRA-FA's A) is frozen in PEFT's model too. The largest difference of the two
   models' logits on the batch (eval mode) is recorded, as a check that they compute the same thing
   (losses may differ: PEFT's AdaLoRA adds its penalty to the model's loss);
3. one untimed forward and backward of each model (no optimizer step: the process's first-backward
   allocations are made before either is measured); memory, then time
   (:func:`~peftlab.bench.measure.measure_pair`): each library's step under
   :class:`~peftlab.train.memory.PeakMemory`, alternating, twice each, the larger growth above the
   memory in use before the step (on CPU with the RSS following live tensors,
   :func:`~peftlab.bench.heap.live_tensor_rss`); then one untimed round and ``repeats`` rounds of ours, PEFT, so
   that drift in the machine's load hits both alike; the medians of wall and CPU time.

A step is the same for both: zero_grad, the task loss (plus ``pm.regularizer()`` on our side; PEFT's
AdaLoRA adds its own penalty in forward), backward, AdamW at the method's ``default_lr``, then the
method's per-step action (``pm.on_step()``; PEFT's ``update_and_allocate`` where the model has it).
A record's ``status``: ``ok``; ``not_applicable`` (the method does not apply to the model);
``not_in_peft`` (this config has no PEFT form); ``peft_failed`` (PEFT raised: the error is kept);
``failed`` (our side raised).
"""

from __future__ import annotations

import json
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from peftlab.bench.libs import train_step, trainable
from peftlab.bench.measure import measure_pair, median
from peftlab.bench.standard_run import FULL

#: The ``job_kind`` of a compare job and of its record in ``results.jsonl``.
COMPARE = "peft_compare"
#: Statuses of a finished compare record (a re-run skips them).
COMPARE_DONE = ("not_in_peft", "peft_failed")
LIBS = ("peftlab", "peft")
MEMORY_ROUNDS = 2
DEFAULT_REPEATS = 5


class PeftSideError(RuntimeError):
    """Hugging Face PEFT could not build or step the twin model (PEFT's error is the cause)."""


class NotInPeft(ValueError):
    """The method's config has no Hugging Face PEFT form."""


def peft_type_of(method: str) -> str | None:
    """PEFT's ``peft_type`` of a method string when PEFT has the method: a single registered method
    (not a union, hybrid or base-changing form) whose registry entry declares a PEFT format."""
    from peftlab.core.config import AdapterConfig, BaseChangingConfig, HybridConfig, parse_method_string
    from peftlab.core.registry import get_method

    if method == FULL:
        return None
    try:
        cfg = parse_method_string(method)
    except ValueError:
        return None
    if not isinstance(cfg, AdapterConfig) or isinstance(cfg, (HybridConfig, BaseChangingConfig)):
        return None
    fmt = get_method(cfg.method).peft
    return fmt.peft_type if fmt is not None else None


def compare_jobs(methods: list[str], models: list[str], task: dict[str, Any], budget: dict[str, Any],
                 device: str, threads: int, repeats: int) -> list[dict[str, Any]]:
    """One compare job per model and method that PEFT also has, on ``task``'s first batch, seed 0."""
    return [{"job_kind": COMPARE, "method": method, "model": model, "task": task, "seed": 0, "budget": budget,
             "device": device, "threads": threads, "repeats": repeats}
            for model in models for method in methods if peft_type_of(method)]


# -- the two models -----------------------------------------------------------------------------------
def _frozen_file_keys(pm: Any, adapter: str = "default") -> set[str]:
    """File keys (PEFT's state-dict names) of the adapter tensors we keep frozen."""
    from peftlab.core.io import file_key

    cfg = pm.configs[adapter]
    keys = set()
    for part, module, delta in pm.placements[adapter]:
        frozen = {p.data_ptr() for p in delta.parameters() if not p.requires_grad}
        keys |= {file_key(cfg, part, module, key) for key, t in delta.file_state().items() if t.data_ptr() in frozen}
    return keys


def _freeze_like(peft_model: nn.Module, frozen_keys: set[str]) -> list[str]:
    """Freeze PEFT's parameters stored under ``frozen_keys``; returns their file keys."""
    from peft.utils import get_peft_model_state_dict

    by_ptr = {p.data_ptr(): p for p in peft_model.parameters() if p.requires_grad}
    done = []
    for name, tensor in get_peft_model_state_dict(peft_model).items():
        param = by_ptr.get(tensor.data_ptr())
        if name in frozen_keys and param is not None:
            param.requires_grad_(False)
            done.append(name)
    return sorted(done)


def peft_twin(pm: Any, fresh_model: nn.Module, workdir: Path) -> tuple[nn.Module, list[str]]:
    """PEFT's model with our adapter's weights: our adapter saved in PEFT's format, PEFT's config read
    back by PEFT, ``peft.get_peft_model`` on ``fresh_model`` and the saved tensors loaded into it
    (``PeftModel.from_pretrained`` refuses a trainable prompt-learning adapter); the tensors we keep
    frozen are frozen there too (returned: their file keys). Raises :class:`NotInPeft` when the config
    has no PEFT form and :class:`PeftSideError` for PEFT's own errors."""
    from safetensors.torch import load_file

    from peftlab.core.io import CONFIG_NAME, WEIGHTS_NAME

    pm.save(workdir)
    fields = json.loads((workdir / CONFIG_NAME).read_text())
    if fields.get("peft_type") == "PEFTLAB":
        raise NotInPeft("this config has no PEFT form (adapter_config.json is written as peft_type PEFTLAB)")
    frozen = _frozen_file_keys(pm)
    try:
        import peft
        from peft.utils import set_peft_model_state_dict

        config = peft.PeftConfig.from_pretrained(str(workdir))
        config.inference_mode = False  # a saved config says True; trainable, as is_trainable=True makes it
        twin = peft.get_peft_model(fresh_model, config)
        result = set_peft_model_state_dict(twin, load_file(str(workdir / WEIGHTS_NAME)))
    except Exception as err:  # noqa: BLE001 - PEFT's failure is a result, reported with its message
        raise PeftSideError(f"PEFT could not build the adapter ({fields.get('peft_type')}): "
                            f"{type(err).__name__}: {err}") from err
    # PEFT loads a prompt-learning adapter's "prompt_embeddings" apart, and still lists it as unexpected.
    unexpected = [k for k in result.unexpected_keys if k != "prompt_embeddings"]
    if unexpected:
        raise PeftSideError(f"PEFT's model has no place for {len(unexpected)} of our tensors, e.g. {unexpected[0]}")
    return twin, _freeze_like(twin, frozen)


# -- steps ----------------------------------------------------------------------------------------------
def _ours_step(pm: Any, batch: dict[str, Any], kind: str, lr: float) -> Callable[[], None]:
    from peftlab.train.evaluation import forward_loss

    return train_step(pm, trainable(pm), lr, lambda: forward_loss(pm, batch, kind)[0] + pm.regularizer(),
                      after_step=pm.on_step)


def _peft_step(twin: nn.Module, batch: dict[str, Any], kind: str, lr: float) -> Callable[[], None]:
    from peftlab.train.evaluation import forward_loss

    allocate = getattr(getattr(twin, "base_model", None), "update_and_allocate", None)  # AdaLoRA's schedule
    count = [0]

    def after_step() -> None:
        count[0] += 1
        if allocate is not None:
            allocate(count[0])

    step = train_step(twin, trainable(twin), lr, lambda: forward_loss(twin, batch, kind)[0], after_step=after_step)

    def guarded() -> None:
        try:
            step()
        except Exception as err:  # noqa: BLE001 - PEFT's failure is a result
            raise PeftSideError(f"PEFT's training step failed: {type(err).__name__}: {err}") from err

    return guarded


def _backward_once(net: nn.Module, batch: dict[str, Any], kind: str) -> None:
    """One forward and backward of ``net`` in training mode, gradients dropped, no optimizer step:
    the process's one-time allocations of a first backward are then made before either library's
    measured steps, instead of being charged to whichever steps first."""
    from peftlab.train.evaluation import forward_loss

    net.train()
    forward_loss(net, batch, kind)[0].backward()
    for p in net.parameters():
        p.grad = None


def _eval_outputs(net: nn.Module, batch: dict[str, Any], kind: str) -> tuple[float, torch.Tensor]:
    """(task loss, logits) of ``net`` on ``batch`` in eval mode, without autograd."""
    from peftlab.train.evaluation import forward_loss

    net.eval()
    with torch.no_grad():
        loss, logits = forward_loss(net, batch, kind)
    net.train()
    return float(loss), logits.float()


# -- one compare job ---------------------------------------------------------------------------------------
def _measure(job: dict[str, Any], record: dict[str, Any]) -> None:
    """Fill ``record`` (raises :class:`NotInPeft`, :class:`PeftSideError` or our own errors). On CPU
    the job runs from its start with the RSS following live tensors
    (:func:`~peftlab.bench.heap.live_tensor_rss`): heap memory freed before the measured steps would
    otherwise be reused by them and counted as growth (the time rounds run with glibc's thresholds
    at their maxima, as :func:`~peftlab.bench.measure.measure_pair` leaves them)."""
    from peftlab.bench.heap import live_tensor_rss

    with live_tensor_rss() if torch.device(job.get("device") or "cpu").type == "cpu" else nullcontext(False):
        _measure_job(job, record)


def _measure_job(job: dict[str, Any], record: dict[str, Any]) -> None:
    import peft

    import peftlab
    from peftlab.bench.standard_run import apply_method, load_model, prepare, seed_everything
    from peftlab.train.evaluation import to_device

    budget, seed = job["budget"], int(job["seed"])
    run = prepare(job)
    train_ex, model, device = run.train, run.model, run.device
    if run.not_applicable is not None:
        record.update(status="not_applicable", error=run.not_applicable)
        return
    batch = to_device(next(iter(run.train_loader)), device)
    record["batch_shape"] = list(batch["input_ids"].shape)
    seed_everything(seed)
    pm, _, lr, counts = apply_method(job, model.to(device))
    pm.begin_training(int(budget["steps"]))  # as the trainer does (AdaLoRA's schedule takes the run's length)
    record.update(config_resolved=counts["config_resolved"], lr=lr, peft_type=peft_type_of(job["method"]),
                  peft_version=peft.__version__, peftlab_version=peftlab.__version__)
    fresh, _ = load_model(job["model"], train_ex.kind, train_ex.num_labels)
    with tempfile.TemporaryDirectory(prefix="peftlab-compare-") as tmp:
        twin, mirrored = peft_twin(pm, fresh.to(device), Path(tmp))
    nets = {"peftlab": pm, "peft": twin}
    record["frozen_in_peft_to_match"] = mirrored
    for lib, net in nets.items():
        record[f"{lib}_trainable"] = sum(p.numel() for p in trainable(net))
    try:
        record["peft_loss"], theirs = _eval_outputs(twin, batch, train_ex.kind)
    except Exception as err:  # noqa: BLE001
        raise PeftSideError(f"PEFT's forward failed: {type(err).__name__}: {err}") from err
    record["peftlab_loss"], ours = _eval_outputs(pm, batch, train_ex.kind)
    record["logits_max_abs_diff"] = float((ours - theirs).abs().max())
    steps = {"peftlab": _ours_step(pm, batch, train_ex.kind, lr), "peft": _peft_step(twin, batch, train_ex.kind, lr)}
    for net in nets.values():
        _backward_once(net, batch, train_ex.kind)

    repeats = int(job.get("repeats", DEFAULT_REPEATS))
    times, peaks, record["memory_method"] = measure_pair(steps, repeats, device, MEMORY_ROUNDS, live_rss=True)
    for lib in LIBS:
        record[f"{lib}_step_ms"] = 1000 * median(times[lib]["wall"])
        record[f"{lib}_cpu_ms"] = 1000 * median(times[lib]["cpu"])
        record[f"{lib}_steps_ms"] = [1000 * t for t in times[lib]["wall"]]
        record[f"{lib}_peak_mb"] = peaks[lib]
    record.update(
        status="ok", repeats=repeats,
        time_ratio=record["peftlab_step_ms"] / record["peft_step_ms"] if record["peft_step_ms"] else None,
        cpu_ratio=record["peftlab_cpu_ms"] / record["peft_cpu_ms"] if record["peft_cpu_ms"] else None,
        peak_diff_mb=peaks["peftlab"] - peaks["peft"],
    )


def run_compare(job: dict[str, Any]) -> dict[str, Any]:
    """Run one compare job and return its record (never raises; see the module docstring)."""
    from peftlab.bench.standard_run import recorded

    return recorded(job, _measure, {NotInPeft: "not_in_peft", PeftSideError: "peft_failed"}, job_kind=COMPARE)
