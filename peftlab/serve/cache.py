"""The adapter cache: every registered adapter, on one of three tiers.

* **device**: in the adapter bank (LoRA family; at most ``device_adapters`` slots) or attached to
  the engine's ``PeftModel`` (other methods, routed per row), with its prefix or soft prompt
  (:mod:`~peftlab.serve.virtual`) copied to the device, ready for the next step;
* **host**: read and checked, kept in host memory (a LoRA adapter as one flat row already laid out
  for the bank, pinned when the device is a GPU), least recently used first out beyond
  ``host_budget_bytes``; moving one to the device is one copy;
* **disk**: only its checked path is kept; a loader thread reads it back when a request needs it,
  off the decode loop.

An entry is one registration of a name: loading a name again, or unloading it, leaves the old entry
to the requests that already hold it (they finish with the adapter they were submitted with), and
its device slot is freed once none does. Only the engine's decode thread changes the device tier.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager

import torch
from torch import nn

from peftlab.core.model import PeftModel

from .adapters import ReadAdapter, read_adapter_dir, resolve_adapter_dir
from .bank import AdapterBank
from .errors import InvalidAdapterError, ServeError, UnknownAdapterError
from .virtual import VirtualInput


@dataclass(eq=False)
class AdapterEntry:
    """One registered adapter (see the module docstring)."""

    name: str
    path: Path
    serial: int
    kind: str  # "bank" (LoRA family), "routed" (attached to the PeftModel, routed per row), "virtual" (neither)
    nbytes: int
    #: host copy: (layers, VirtualInput or None), layers being (flat row, its layout) for "bank",
    #: (config, placement) for "routed", None for "virtual"; None on disk
    host: Any = None
    slot: int | None = None  # bank row while on the device
    attached: bool = False  # "routed": attached to the engine's PeftModel
    virtual: VirtualInput | None = None  # its prefix / soft prompt on the device
    virtual_length: int = 0  # positions a request of this adapter occupies before its prompt
    prompt_length: int = 0  # of which soft-prompt tokens, prefilled with the prompt
    gated: bool = False  # a gate averages over a call's positions: its prefill rows are never padded
    resident: bool = False  # on the device tier
    queued: int = 0
    running: int = 0
    unloaded: bool = False
    loading: bool = False
    error: ServeError | None = None
    last_used: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> str:
        """The name this entry has inside the engine's PeftModel (unique per registration)."""
        return f"{self.name}@{self.serial}"

    @property
    def on_device(self) -> bool:
        return self.resident

    @property
    def live(self) -> bool:
        """Requests hold it (waiting or running)."""
        return self.queued > 0 or self.running > 0


class AdapterCache:
    """Registered adapters on their tiers; see the module docstring."""

    def __init__(self, model: nn.Module, pm: PeftModel, bank: AdapterBank, *, device_adapters: int,
                 host_budget_bytes: int, allowed_roots: Sequence[str] | None, max_adapter_bytes: int,
                 on_ready: Callable[[], None], base_access: Callable[[], ContextManager] = contextlib.nullcontext):
        self.model, self.pm, self.bank = model, pm, bank
        self.device_adapters = device_adapters
        self.host_budget_bytes = host_budget_bytes
        self.allowed_roots = None if allowed_roots is None else [str(r) for r in allowed_roots]
        self.max_adapter_bytes = max_adapter_bytes
        self.on_ready = on_ready
        self.base_access = base_access  # a moment with the base model's own weights (read_adapter_dir)
        self.lock = threading.RLock()
        self.registry: dict[str, AdapterEntry] = {}
        self._host: OrderedDict[int, AdapterEntry] = OrderedDict()  # id -> entry, least recent first
        self.host_bytes = 0
        self._device: OrderedDict[int, AdapterEntry] = OrderedDict()
        self._retired: list[AdapterEntry] = []  # unloaded or replaced entries still on a tier
        self._serial = itertools.count(1)
        self.hits = self.host_hits = self.misses = 0
        self.promote_ms: list[float] = []  # host -> device times, most recent last
        self._loads: queue.Queue = queue.Queue()
        self._loader = threading.Thread(target=self._load_loop, name="peftlab-adapter-loader", daemon=True)
        self._loader.start()

    # -- registration (any thread) ------------------------------------------------------------------
    def register(self, name: str, path: Any) -> AdapterEntry:
        """Check and read an adapter directory and register it under ``name`` (replacing an earlier
        registration of that name); it lands on the host tier."""
        real = resolve_adapter_dir(path, self.allowed_roots, self.max_adapter_bytes)
        read = read_adapter_dir(real, self.model, self.base_access)
        entry = AdapterEntry(name, real, next(self._serial), read.kind, read.nbytes, gated=read.gated)
        if read.virtual is not None:
            entry.virtual_length, entry.prompt_length = read.virtual.length, read.virtual.prompt_length
        entry.host = self._host_copy(read)
        with self.lock:
            old = self.registry.get(name)
            self.registry[name] = entry
            self._host_put(entry)
            if old is not None:
                self._retire(old)
        return entry

    def _host_copy(self, read: ReadAdapter) -> tuple[Any, VirtualInput | None]:
        if read.factors is None:
            return ((read.config, read.placement) if read.placement else None), read.virtual
        layout = self.bank.layout
        if not layout.covers(read.factors):
            layout = layout.extended(read.factors)
        return (layout.pack(read.factors, self.bank.dtype, pin=self.bank.device.type == "cuda"), layout), read.virtual

    def unregister(self, name: str) -> None:
        """Forget ``name``: new requests for it are refused; requests already holding it finish."""
        with self.lock:
            entry = self.registry.pop(name, None)
            if entry is None:
                raise UnknownAdapterError(f"no adapter named {name!r} is loaded; loaded: {self.names()[:20]}")
            self._retire(entry)

    def _retire(self, entry: AdapterEntry) -> None:
        entry.unloaded = True
        self._retired.append(entry)

    def names(self) -> list[str]:
        """Registered adapter names, in registration order."""
        with self.lock:
            return list(self.registry)

    def get(self, name: str) -> AdapterEntry:
        """The current entry of ``name`` (:class:`UnknownAdapterError` if none)."""
        with self.lock:
            entry = self.registry.get(name)
        if entry is None:
            names = self.names()
            raise UnknownAdapterError(
                f"no adapter named {name!r} is loaded ({len(names)} loaded" + (f": {names[:20]}" if names else "")
                + "); load it first (Engine.load_adapter / POST /v1/load_lora_adapter)")
        return entry

    # -- host tier --------------------------------------------------------------------------------------
    def _host_put(self, entry: AdapterEntry) -> None:
        """Hold ``entry`` in host memory (most recent); drop the least recently used others beyond
        the budget (they go back to the disk tier)."""
        if id(entry) not in self._host:
            self.host_bytes += entry.nbytes
        self._host[id(entry)] = entry
        self._host.move_to_end(id(entry))
        for key in list(self._host):
            if self.host_bytes <= self.host_budget_bytes:
                break
            if key != id(entry):
                self._host_drop(self._host[key])

    def _host_drop(self, entry: AdapterEntry) -> None:
        if self._host.pop(id(entry), None) is not None:
            self.host_bytes -= entry.nbytes
        entry.host = None

    def host_count(self) -> int:
        """Entries held in host memory."""
        return len(self._host)

    def _load_loop(self) -> None:
        while True:
            entry = self._loads.get()
            if entry is None:
                return
            try:
                real = resolve_adapter_dir(entry.path, self.allowed_roots, self.max_adapter_bytes)
                read = read_adapter_dir(real, self.model, self.base_access)
                host = self._host_copy(read)
                with self.lock:
                    entry.host = host
                    self._host_put(entry)
            except ServeError as e:
                entry.error = e
            except Exception as e:  # noqa: BLE001 -- any failure ends the requests waiting for it, with its cause
                entry.error = InvalidAdapterError(f"adapter {entry.name!r} could not be read back from {entry.path}: {e}")
            finally:
                entry.loading = False
                self.on_ready()

    def close(self) -> None:
        """Stop the loader thread."""
        self._loads.put(None)

    # -- device tier (decode thread only) ---------------------------------------------------------
    def ensure_device(self, entry: AdapterEntry) -> bool:
        """Make ``entry`` usable in the next call; False while it is on its way (from disk, via the
        loader thread) or while every device place is held by running requests."""
        entry.last_used = time.monotonic()
        if entry.on_device:
            self.hits += 1
            self._device.move_to_end(id(entry))
            return True
        with self.lock:
            host = entry.host
            if host is None:
                if not entry.loading and entry.error is None:
                    entry.loading = True
                    self.misses += 1
                    self._loads.put(entry)
                return False
            if id(entry) in self._host:
                self._host.move_to_end(id(entry))
        if not self._make_room():
            return False
        t0 = time.perf_counter()
        layers, virtual = host
        if entry.kind == "bank":
            flat, layout = layers
            if layout is not self.bank.layout and layout != self.bank.layout:  # rare: re-lay, re-pack
                self.bank.ensure_layout(layout.unpack(flat))
                if layout != self.bank.layout:
                    flat = self.bank.repack(flat, layout)
                entry.host = ((flat, self.bank.layout), virtual)
            entry.slot = self._free_slot()
            self.bank.put(entry.slot, flat)
        elif entry.kind == "routed":
            cfg, placement = layers
            self.pm.attach(entry.key, cfg, placement)  # the layer parts only: the engine serves the rest
            entry.attached = True
        if virtual is not None:
            entry.virtual = virtual.to(self.bank.device)
        entry.resident = True
        if self.bank.device.type == "cuda":
            torch.cuda.synchronize(self.bank.device)
        self.promote_ms.append(1000 * (time.perf_counter() - t0))
        del self.promote_ms[:-256]
        self.host_hits += 1
        self._device[id(entry)] = entry
        return True

    def _used_slots(self) -> set[int]:
        return {e.slot for e in self._device.values() if e.slot is not None}

    def _free_slot(self) -> int:
        used = self._used_slots()
        return next(s for s in range(1, self.device_adapters + 1) if s not in used)

    def _make_room(self) -> bool:
        """Free a device place if all are taken: the least recently used entry no running request uses."""
        if len(self._device) < self.device_adapters:
            return True
        for key, old in list(self._device.items()):
            if old.running == 0 and not (old.slot is not None and old.slot == self.bank.merged):
                self._evict(old)
                return True
        return False

    def _evict(self, entry: AdapterEntry) -> None:
        self._device.pop(id(entry), None)
        if entry.slot is not None:
            self.bank.clear(entry.slot)
            entry.slot = None
        if entry.attached:
            self.pm.delete_adapter(entry.key)
            entry.attached = False
        entry.virtual = None
        entry.resident = False

    def maintain(self) -> None:
        """Drop retired entries no request holds from every tier (decode thread, between steps)."""
        with self.lock:
            keep = []
            for entry in self._retired:
                if entry.live:
                    keep.append(entry)
                    continue
                if entry.slot is not None and entry.slot == self.bank.merged:
                    self.bank.unmerge()
                self._evict(entry)
                self._host_drop(entry)
            self._retired = keep

    def merged_name(self) -> str | None:
        """The name of the adapter merged into the base weights now, or None."""
        merged = self.bank.merged
        return next((e.name for e in list(self._device.values()) if merged is not None and e.slot == merged), None)

    def device_count(self) -> int:
        """Entries on the device tier."""
        return len(self._device)
