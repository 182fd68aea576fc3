"""Several processes training one adapter through PyTorch's own engines: DDP, or FSDP2 for bases too
big for one device. peftlab adds no communication of its own.

``torchrun --nproc_per_node N -m peftlab train ...`` and ``accelerate launch`` set ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK``; :func:`start_processes` reads them and joins the process group (gloo on
CPU, NCCL on CUDA; ``MASTER_ADDR``/``MASTER_PORT`` come from the launcher too). Without them it
returns :class:`OneProcess`, whose collectives are the identity, so the trainer has one code path.

What :class:`ProcessGroup` guarantees:

- the same start everywhere: every process loads the base from the same files; the trainable
  parameters are broadcast from process 0 and then every process's parameters are compared
  (checksums of the trainable and of the frozen ones), before DDP or FSDP takes the model;
- DDP reduces only the trainable parameters: the frozen base is left out of DDP
  (``_ddp_params_and_buffers_to_ignore``), so neither the start-up broadcast nor the reducer's
  buckets hold it (``describe()`` reports what the reducer holds);
- each process trains on its own share of the data (``train/sharding.py``), and the loss of each
  step and the counts of the report are averaged / summed over the processes;
- evaluation is shared out too and gathered: every process scores its share, then all of them
  combine loss sums, counts, predictions and labels, and compute the metrics on the whole set;
- only process 0 writes files and shows a progress bar; under FSDP the adapter is gathered from its
  shards first (every process takes part).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from peftlab.core.model import PeftModel
from peftlab.train.sharding import batches_per_share, shard_loader

#: evaluate_model's gather hook: (loss sum, count, predictions, labels, repeat the last forward) ->
#: the same four over every process.
EvalGather = Callable[[float, int, list[torch.Tensor], list[torch.Tensor], Callable[[], Any]],
                      tuple[float, int, list[torch.Tensor], list[torch.Tensor]]]

LAUNCH_HINT = "torchrun --nproc_per_node N -m peftlab train ... (or accelerate launch --multi_gpu --num_processes N)"
#: accelerate's switch for loading the weights on process 0 only (read by transformers' from_pretrained).
RAM_EFFICIENT_LOADING = "FSDP_CPU_RAM_EFFICIENT_LOADING"
#: Relative difference of parameter checksums taken as "the same model" across processes.
CHECKSUM_RTOL = 1e-6


class ProcessesError(RuntimeError):
    """The processes of a run disagree or cannot start; the message says which and what to do."""


class OneProcess:
    """A run in one process: every collective is the identity, nothing is wrapped or shared out."""

    rank = 0
    local_rank = 0
    world_size = 1
    strategy = "single"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        """A run on ``device``."""
        self.device = torch.device(device)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files, logs and the progress bar (process 0)."""
        return self.rank == 0

    def step_totals(self, loss: float, examples: int, tokens: int) -> tuple[float, int, int]:
        """One step's loss averaged, and its examples and tokens summed, over the processes."""
        return loss, examples, tokens

    def prepare(self, pm: PeftModel) -> nn.Module:
        """The module to train: ``pm`` itself here; DDP or FSDP over it with several processes."""
        return pm

    def shard_train(self, loader: DataLoader) -> DataLoader:
        """This process's share of the training data (here: all of it)."""
        return loader

    def shard_eval(self, loader: DataLoader, kind: str) -> DataLoader:
        """This process's share of an evaluation set of task ``kind`` (here: all of it)."""
        return loader

    def eval_gather(self, loader: Any) -> EvalGather | None:
        """The hook that combines the processes' evaluations of ``loader`` (None: nothing to combine)."""
        return None

    def full_adapters(self) -> contextlib.AbstractContextManager[Any]:
        """Context in which the adapter's parameters are whole, to save or count them (here: always)."""
        return contextlib.nullcontext()

    def barrier(self) -> None:
        """Wait for every process (here: nothing to wait for)."""

    def describe(self) -> dict[str, Any]:
        """What the report records about the processes."""
        return {"world_size": 1, "strategy": self.strategy}

    def close(self) -> None:
        """Leave the process group (nothing to do here)."""


class ProcessGroup(OneProcess):
    """This process's part in a run of ``world_size`` processes (module docstring). Made by
    :func:`start_processes`, which has joined the default process group."""

    def __init__(self, rank: int, local_rank: int, world_size: int, device: torch.device, fsdp: bool) -> None:
        """Remember this process's place; the default process group must already be initialised."""
        super().__init__(device)
        self.rank = rank
        self.local_rank = local_rank
        self.world_size = world_size
        self.strategy = "fsdp" if fsdp else "ddp"
        self.pm: PeftModel | None = None
        self.wrapped: nn.Module | None = None
        self.broadcast_changed: bool | None = None

    # -- collectives on numbers ---------------------------------------------------------------------
    def step_totals(self, loss: float, examples: int, tokens: int) -> tuple[float, int, int]:
        """One step's loss averaged, and its examples and tokens summed, over the processes (one
        all-reduce). The mean of the processes' mean losses is the global batch's mean loss when
        their batches are equal in size (as the padded shares make them, but for an epoch's last)."""
        import torch.distributed as dist  # noqa: PLC0415

        t = torch.tensor([loss, examples, tokens], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t[0]) / self.world_size, int(round(float(t[1]))), int(round(float(t[2])))

    def _gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist  # noqa: PLC0415

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every process."""
        import torch.distributed as dist  # noqa: PLC0415

        dist.barrier()

    # -- the model -------------------------------------------------------------------------------
    def prepare(self, pm: PeftModel) -> nn.Module:
        """Make the processes' models one model, then wrap it: DDP over ``pm`` (frozen base left out),
        or FSDP2 units of blocks with their deltas (``train/fsdp.py``; ``pm`` is sharded in place, so
        build the optimizer after this call)."""
        pm.to(self.device)
        self.broadcast_changed = broadcast_trainable(pm)
        check_same_model(self._gather(model_checksums(pm)))
        self.pm = pm
        if self.strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415

            from peftlab.train.fsdp import shard_with_blocks  # noqa: PLC0415

            mesh = init_device_mesh(self.device.type, (self.world_size,))
            self.wrapped = shard_with_blocks(pm, mesh)
        else:
            self.wrapped = wrap_ddp(pm, self.device)
        return self.wrapped

    # -- data --------------------------------------------------------------------------------------
    def shard_train(self, loader: DataLoader) -> DataLoader:
        """This process's padded share of the training data (``train/sharding.py``)."""
        return shard_loader(loader, self.rank, self.world_size, pad=True)

    def shard_eval(self, loader: DataLoader, kind: str) -> DataLoader:
        """This process's share of a classification or regression eval set; other kinds (scored by
        generation) are evaluated whole by every process, since their scoring gathers nothing."""
        if kind not in ("classification", "regression"):
            return loader
        return shard_loader(loader, self.rank, self.world_size, pad=False)

    def eval_gather(self, loader: Any) -> EvalGather | None:
        """For a loader made by :meth:`shard_eval`: first run the last forward again until this
        process has run as many as the process with the most batches (DDP and FSDP forwards are
        collective), then gather everyone's loss sum, count, predictions and labels."""
        try:
            most = max(batches_per_share(loader))
        except TypeError:
            return None

        def gather(loss_sum: float, count: int, preds: list[torch.Tensor], labels: list[torch.Tensor],
                   repeat_last: Callable[[], Any]) -> tuple[float, int, list[torch.Tensor], list[torch.Tensor]]:
            for _ in range(most - len(preds)):
                repeat_last()
            parts = self._gather((loss_sum, count, torch.cat(preds).cpu(), torch.cat(labels).cpu()))
            return (sum(p[0] for p in parts), sum(p[1] for p in parts), [p[2] for p in parts], [p[3] for p in parts])

        return gather

    # -- files ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def full_adapters(self) -> Iterator[None]:
        """Inside the block the adapter's parameters are whole on every process (FSDP: gathered from
        the shards, every process must enter; DDP: they already are)."""
        if self.strategy == "fsdp" and self.pm is not None:
            from peftlab.train.fsdp import full_adapters  # noqa: PLC0415

            with full_adapters(self.pm):
                yield
        else:
            yield

    def describe(self) -> dict[str, Any]:
        """World size, strategy, backend, whether the broadcast from process 0 changed this process's
        adapter, and what the engine holds: for DDP the reducer's tensors and bytes (the trainable
        parameters only), for FSDP the number of units."""
        import torch.distributed as dist  # noqa: PLC0415

        out: dict[str, Any] = {"world_size": self.world_size, "strategy": self.strategy, "backend": dist.get_backend(),
                               "broadcast_changed_adapter": self.broadcast_changed}
        if self.wrapped is not None and self.strategy == "ddp":
            out.update(ddp_reducer_size(self.wrapped))
        elif self.wrapped is not None:
            from peftlab.train.fsdp import fsdp_units  # noqa: PLC0415

            out["fsdp_units"] = len(fsdp_units(self.wrapped))
        return out

    def close(self) -> None:
        """Leave the process group."""
        import torch.distributed as dist  # noqa: PLC0415

        if dist.is_initialized():
            dist.destroy_process_group()


def add_distributed_arguments(train: argparse.ArgumentParser) -> None:
    """``--fsdp``, added to ``train`` (the ``peftlab train`` parser)."""
    train.add_argument("--fsdp", action="store_true",
                       help="with several processes (torchrun / accelerate launch), shard the base and the adapter "
                            "with FSDP2, one unit per transformer block with its adapter's deltas, instead of DDP")


def check_fsdp_options(processes: OneProcess, args: argparse.Namespace) -> None:
    """Under FSDP the optimizer state is sharded and no checkpoint is written (resuming it is not
    implemented): ``--save-every``, ``--eval-every`` (which checkpoints too) and ``--resume`` are
    refused with a :class:`ProcessesError`."""
    if processes.strategy != "fsdp":
        return
    given = [f"--{name.replace('_', '-')}" for name in ("save_every", "eval_every", "resume") if getattr(args, name, None)]
    if given:
        raise ProcessesError(f"{', '.join(given)}: an FSDP run writes no checkpoints (its optimizer state is sharded "
                             "and resuming it is not implemented); it evaluates at the end. Use DDP (no --fsdp) "
                             "for checkpoints, evaluations during training and --resume")


def launched_world() -> tuple[int, int, int] | None:
    """(rank, local rank, world size) from a launcher's environment (torchrun, accelerate launch),
    or None when this process was not started by one."""
    if "WORLD_SIZE" not in os.environ:
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise ProcessesError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers ({err}); they are set by "
                             f"{LAUNCH_HINT}") from None
    return rank, local, world


def accelerate_wants_fsdp() -> bool:
    """Whether ``accelerate launch`` was asked for FSDP (``--use_fsdp`` or ``distributed_type: FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")


def process_device(device: str, local_rank: int, world_size: int) -> torch.device:
    """The device of this process: ``cuda``/``auto`` on a GPU machine means ``cuda:LOCAL_RANK``
    (one GPU per process); a fixed ``cuda:N`` is refused with several processes (they would share it)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is not None and world_size > 1 and dev.index != local_rank:
            raise ProcessesError(f"--device {device}: with {world_size} processes each one takes cuda:LOCAL_RANK; "
                                 "give --device cuda or auto")
        return torch.device("cuda", local_rank)
    if dev.type != "cpu":
        raise ProcessesError(f"--device {device}: several processes run on CPU (gloo) or CUDA (NCCL), not on {dev.type}")
    return dev


def start_processes(device: str, fsdp: bool = False) -> OneProcess:
    """Join the run a launcher started (gloo on CPU, NCCL on CUDA; ``init_method`` from the
    environment), or :class:`OneProcess` when there is no launcher. ``device`` is the checked
    ``--device``; ``fsdp``: shard with FSDP2 instead of DDP (also when ``accelerate launch`` was told
    to use FSDP)."""
    world = launched_world()
    fsdp = fsdp or accelerate_wants_fsdp()
    if world is None:
        if fsdp:
            raise ProcessesError(f"--fsdp shards the model over several processes: launch it with {LAUNCH_HINT} --fsdp")
        return OneProcess(device)
    rank, local_rank, world_size = world
    if world_size == 1 and not fsdp:
        return OneProcess(device)
    if accelerate_wants_fsdp() and os.environ.get(RAM_EFFICIENT_LOADING, "").lower() in ("1", "true", "yes"):
        # With it transformers loads real weights on process 0 only (meta tensors elsewhere), to be
        # broadcast by accelerate's FSDP1 wrapping, which peftlab does not use.
        os.environ[RAM_EFFICIENT_LOADING] = "false"
        if rank == 0:
            print(f"peftlab: {RAM_EFFICIENT_LOADING}=true (accelerate's --fsdp_cpu_ram_efficient_loading) ignored: "
                  "every process loads the base from its files", file=sys.stderr)
    import torch.distributed as dist  # noqa: PLC0415

    dev = process_device(device, local_rank, world_size)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return ProcessGroup(rank, local_rank, world_size, dev, fsdp)


# -- the model's start, checked -------------------------------------------------------------------

def broadcast_trainable(pm: PeftModel) -> bool:
    """Copy process 0's trainable parameters to every process; returns whether this process's values
    changed (they were initialised differently)."""
    import torch.distributed as dist  # noqa: PLC0415

    changed = False
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                before = p.detach().clone()
                dist.broadcast(p.data, src=0)
                changed |= not torch.equal(before, p.data)
    return changed


def model_checksums(pm: nn.Module) -> dict[str, list[float]]:
    """Σ x and Σ x² (float64) of the trainable and of the frozen floating-point parameters."""
    sums = {"trainable": [0.0, 0.0], "frozen": [0.0, 0.0]}
    with torch.no_grad():
        for p in pm.parameters():
            if not p.is_floating_point():
                continue
            x = p.detach().double()
            key = "trainable" if p.requires_grad else "frozen"
            sums[key][0] += float(x.sum())
            sums[key][1] += float(x.square().sum())
    return sums


def check_same_model(everyone: list[dict[str, list[float]]]) -> None:
    """Raise :class:`ProcessesError` unless every process's checksums (:func:`model_checksums`,
    gathered in rank order) match process 0's within :data:`CHECKSUM_RTOL`."""
    reference = everyone[0]
    for other_rank, sums in enumerate(everyone):
        for key in ("trainable", "frozen"):
            for mine, theirs in zip(reference[key], sums[key]):
                if not math.isclose(mine, theirs, rel_tol=CHECKSUM_RTOL, abs_tol=1e-9):
                    what = "adapter" if key == "trainable" else "base model"
                    raise ProcessesError(
                        f"process {other_rank} holds a different {what} than process 0 ({key} checksum {theirs!r} "
                        f"vs {mine!r}): every process must load the same model files and method")


def wrap_ddp(pm: PeftModel, device: torch.device) -> nn.Module:
    """``DistributedDataParallel`` over ``pm`` with every frozen parameter left out, so the reducer
    all-reduces the trainable parameters only."""
    from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

    frozen = [n for n, p in pm.named_parameters() if not p.requires_grad]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(pm, frozen)
    return DistributedDataParallel(pm, device_ids=[device.index] if device.type == "cuda" else None)


def ddp_reducer_size(ddp: nn.Module) -> dict[str, int]:
    """The tensors and bytes DDP's reducer all-reduces, from DDP's own logging data."""
    data = ddp._get_ddp_logging_data()  # type: ignore[operator]
    return {"ddp_reduced_tensors": int(data["num_parameter_tensors"]),
            "ddp_reduced_bytes": int(data["total_parameter_size_bytes"])}


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place: the model itself)."""
    from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

    return model.module if isinstance(model, DistributedDataParallel) else model
