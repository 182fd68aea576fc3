"""The serving engine: continuous batching of many adapters over one base model.

One background thread runs the decode loop. Each iteration:

1. housekeeping: adapters that finished loading, unloaded adapters no request holds any more,
   cancelled requests;
2. dLoRA: the merge policy looks at the live requests' adapters and merges or unmerges one
   (:mod:`~peftlab.serve.merge_policy`, :meth:`~peftlab.serve.bank.AdapterBank.merge`);
3. admission: waiting requests join, earliest deadline first, as far as free rows, the prefill
   token budget and device places for their adapters allow (:mod:`~peftlab.serve.scheduler`);
   their prompts are prefilled in groups of similar length (PetS), each row getting its own place
   in the batched key/value cache (:mod:`~peftlab.serve.kv`);
4. one decode step for every running row at once, whatever their adapters: LoRA-family rows through
   the adapter bank (:mod:`~peftlab.serve.bank`), other layer methods through the library's per-row
   routing (``adapter_names``), rows with a prefix through the prefix written into their cache row
   at prefill (gated prefixes scaled per row at every call), rows with a soft prompt through the
   virtual tokens prefilled before their prompt (:mod:`~peftlab.serve.virtual`), base rows through
   none of these;
   When every running and admitted row is a base or LoRA-family row, 3 and 4 are one fused call:
   the decode tokens and the new prompts packed into one sequence (:mod:`~peftlab.serve.fused`);
5. each row's token is sampled (:mod:`~peftlab.serve.sampling`), turned into text with stop strings
   (:mod:`~peftlab.serve.text`) and streamed; finished rows leave and the others are packed.

A request's output does not depend on the batch it ran in: rows never interact (own cache row, own
mask, own adapter, own counter-based random numbers), so greedy and seeded outputs equal a lone run
up to float rounding of the batched matmuls.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from peftlab.core.follow import adapter_dtype
from peftlab.core.model import PeftModel
from peftlab.core.model_calls import cache_argument, model_dtype

from .bank import AdapterBank
from .cache import AdapterCache, AdapterEntry
from .errors import InvalidRequestError, PromptTooLongError, ServeError
from .fused import FusedStep, fused_call, register_attention, unfusable_reason
from .kv import SlotCache, decode_mask, prefill_mask, prefixed_prefill_mask
from .merge_policy import MergePolicy
from .requests import GenerationRequest, GenerationResult, RequestHandle, TokenEvent
from .sampling import next_tokens
from .scheduler import RequestQueue, Waiting, length_groups, unpadded_where_needed
from .text import TextTracker
from .virtual import CallGates, VirtualInput, soft_prompts_in

__all__ = ["Engine", "GenerationRequest", "GenerationResult", "RequestHandle", "TokenEvent"]

#: Per prefill or fused call: which of the call's tokens (rows × positions, flattened) the LM head
#: runs on (each prompt's last token, each decode token).
_KEEP: ContextVar[torch.Tensor | None] = ContextVar("peftlab_serve_keep", default=None)


@dataclass(eq=False)
class _Row:
    """A running request: its place in the batch and what it has produced."""

    item: Waiting
    slot: int  # bank row (0: none)
    routed: str | None  # PeftModel adapter name for per-row routing, or None
    virtual: VirtualInput | None  # its adapter's prefix / soft prompt, or None
    length: int  # tokens in its cache row = the next token's position
    last: int  # the last token (the next step's input)
    seed: int
    text: TextTracker
    first_token_s: float = 0.0
    finish: str | None = None

    @property
    def request(self) -> GenerationRequest:
        return self.item.request


class Engine:
    """Serves generation requests for many adapters over one base model (see the module docstring).

    Args:
        model: a Hugging Face causal LM (a plain model, not a ``PeftModel``: the engine attaches its own).
        tokenizer: its tokenizer (decoding and the end-of-sequence token).
        max_batch: rows decoded together at most.
        max_queue: waiting requests at most (then :class:`QueueFullError` with ``retry_after``).
        device: where to run (default: where the model is).
        allowed_roots: directories adapters may be loaded from (None: anywhere).
        max_adapter_bytes: largest adapter weights file accepted.
        device_adapters: adapters resident on the compute device (bank slots) at most.
        host_budget_bytes: host memory for adapters read from disk; least recently used beyond it go back to disk.
        merge_policy: True (the default :class:`MergePolicy`), False/None (never merge) or a policy.
        max_context: longest sequence (prompt + output) a request may reach (default: the model's).
        prefill_tokens: prompt tokens prefilled per step at most (one longer prompt still goes alone).
        fused_steps: decode the running rows and prefill the admitted prompts in one packed model call
            when every row is a base or LoRA-family row (:mod:`~peftlab.serve.fused`); off: one call
            per prefill group, then one decode call. Used only if the start-up check passes.
        default_slack_s: a request without a deadline is scheduled as due this long after it arrived.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_batch: int = 32, max_queue: int = 256,
                 device: str | torch.device | None = None, allowed_roots: list[str] | None = None,
                 max_adapter_bytes: int = 2**30, device_adapters: int = 64, host_budget_bytes: int = 2**31,
                 merge_policy: bool | MergePolicy | None = True, max_context: int | None = None,
                 prefill_tokens: int = 2048, default_slack_s: float = 60.0, fused_steps: bool = True):
        if isinstance(model, PeftModel):
            raise TypeError("Engine takes the base model, not a PeftModel: save its adapters (pm.save_pretrained(dir)) "
                            "and load them with engine.load_adapter(name, dir), or pass pm.unload()")
        for arg, value in (("max_batch", max_batch), ("max_queue", max_queue), ("device_adapters", device_adapters),
                           ("prefill_tokens", prefill_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Engine: {arg} must be an integer >= 1, got {value!r}")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise TypeError(f"Engine needs a causal language model with an output head; {type(model).__name__} has "
                            "none (load it for the causal-lm task, e.g. AutoModelForCausalLM)")
        if device is not None:
            model.to(device)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer
        config = getattr(model, "config", None)
        self.max_context = int(max_context or getattr(config, "max_position_embeddings", None) or 2048)
        self.base_name = _base_name(model)
        self.vocab_size = int(getattr(config, "vocab_size", 0) or head.weight.shape[0])
        self.max_batch, self.prefill_tokens = max_batch, prefill_tokens
        self._dtype = model_dtype(model, next(model.parameters()))
        self._cache_arg = cache_argument(model)
        self._eos = _eos_ids(model, tokenizer)
        self._pad = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
        self.policy = MergePolicy() if merge_policy is True else (merge_policy or None)

        self.pm = PeftModel(model)
        self.pm.eval()
        self.bank = AdapterBank(model, device_adapters, self.device, adapter_dtype(self._dtype))
        self._wake = threading.Condition()
        self.adapters = AdapterCache(model, self.pm, self.bank, device_adapters=device_adapters,
                                     host_budget_bytes=host_budget_bytes, allowed_roots=allowed_roots,
                                     max_adapter_bytes=max_adapter_bytes, on_ready=self._notify,
                                     base_access=self._between_steps_unmerged)
        self.queue = RequestQueue(max_queue, default_slack_s)
        self.kv = SlotCache(self.device)
        self.rows: list[_Row] = []
        self._head_hook = head.register_forward_pre_hook(_keep_last_positions, prepend=True)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._step_lock = threading.Lock()  # one step at a time (the loop, or generate before start)
        self._counters = {"requests_done": 0, "requests_failed": 0, "requests_cancelled": 0, "deadline_missed": 0, "steps": 0,
                          "prefill_calls": 0, "fused_calls": 0, "tokens_generated": 0, "merges": 0, "unmerges": 0}
        self._recent_tokens: deque[tuple[float, int]] = deque()
        self._last_batch = 0
        self.fused_steps = False
        self._check_model()
        #: why steps are not fused (None when they are)
        self.unfused_reason: str | None = unfusable_reason(model) if fused_steps else "fused_steps=False"
        if self.unfused_reason is None:
            register_attention()
            try:
                self.fused_steps = self._check_fused()
                if not self.fused_steps:
                    self.unfused_reason = "a fused step differed from plain calls"
            except Exception as e:  # noqa: BLE001 -- an attention the fused step cannot run (e.g. soft-capping)
                self.kv.clear()
                self.unfused_reason = f"a fused step failed: {type(e).__name__}: {e}"

    # -- construction helpers ---------------------------------------------------------------------
    @classmethod
    def from_zoo(cls, name: str = "smollm2", **kw: Any) -> "Engine":
        """An engine over a zoo model (``peftlab.zoo.load(name)``, its causal LM)."""
        from peftlab.zoo import load

        model, tokenizer = load(name, task="causal-lm")
        engine = cls(model, tokenizer, **kw)
        engine.base_name = name
        return engine

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kw: Any) -> "Engine":
        """An engine over a local Hugging Face causal LM directory (offline)."""
        from peftlab.zoo import load

        model, tokenizer = load(os.fspath(path), task="causal-lm")
        engine = cls(model, tokenizer, **kw)
        engine.base_name = os.path.basename(os.path.normpath(os.fspath(path)))
        return engine

    def _check_model(self) -> None:
        """Refuse a model whose attention does not take the engine's batched cache: two prompts of
        different lengths, prefilled together and decoded two steps, must give what plain calls give."""
        prompts = [[1 + i % (self.vocab_size - 1) for i in range(3, 8)], [1 + i % (self.vocab_size - 1) for i in range(9, 12)]]
        with torch.no_grad():
            plain = [self.model(input_ids=torch.tensor([p], device=self.device)).logits[0, -1] for p in prompts]
            first = self._prefill_logits(prompts, start=0, slots=[0, 0], routed=None)
            lengths = torch.tensor([len(p) for p in prompts], device=self.device)
            nxt = first.argmax(-1)
            step = self._decode_logits(nxt, lengths, [0, 0], None)
            again = [self.model(input_ids=torch.tensor([p + [int(t)]], device=self.device)).logits[0, -1]
                     for p, t in zip(prompts, nxt.tolist())]
        self.kv.clear()
        scale = max(float(torch.stack(plain).abs().max()), 1e-3)
        diff = max(float((first - torch.stack(plain)).abs().max()), float((step - torch.stack(again)).abs().max()))
        if not diff <= 1e-3 * scale:
            raise NotImplementedError(
                f"{type(self.model).__name__} does not work with the engine's batched key/value cache (a check "
                f"differed from plain calls by {diff:.3g}): its attention must call cache.update(key, value, "
                "layer_idx) and accept a 4-D attention mask and position_ids, as Llama, Mistral, Qwen2 and GPT-2 do")

    def _check_fused(self) -> bool:
        """Whether fused steps give what plain calls give: two prompts prefilled in one fused call,
        then a fused call decoding both while a third prompt joins."""
        v = self.vocab_size - 1
        prompts = [[1 + i % v for i in range(3, 8)], [1 + i % v for i in range(9, 12)], [1 + i % v for i in range(20, 24)]]
        with torch.no_grad():
            plain = [self.model(input_ids=torch.tensor([p], device=self.device)).logits[0, -1] for p in prompts]
            first = self._fused_logits([], [], [prompts[:1], prompts[1:2]], [0, 0])
            nxt = first.argmax(-1).tolist()
            second = self._fused_logits([len(p) for p in prompts[:2]], nxt, [prompts[2:]], [0, 0, 0])
            again = [self.model(input_ids=torch.tensor([p + [t]], device=self.device)).logits[0, -1]
                     for p, t in zip(prompts, nxt)]
        self.kv.clear()
        want = torch.stack([plain[0], plain[1], again[0], again[1], plain[2]])
        got = torch.cat([first, second])
        scale = max(float(want.abs().max()), 1e-3)
        return float((got - want).abs().max()) <= 1e-3 * scale

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> "Engine":
        """Start the decode loop thread (idempotent); returns the engine."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, name="peftlab-decode-loop", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the decode loop; requests still waiting or running fail with a :class:`ServeError`."""
        self._stopping.set()
        self._notify()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None
        for item in self.queue.remove_if(lambda w: True):
            self._fail(item, ServeError("the engine was stopped before this request ran"))
        self._fail_running(ServeError("the engine was stopped while this request ran"))

    def close(self) -> None:
        """Stop, undo any merge, remove the engine's hooks and stop the loader thread."""
        self.stop()
        self.bank.close()
        self._head_hook.remove()
        self.adapters.close()

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- requests ---------------------------------------------------------------------------------
    def submit(self, req: GenerationRequest) -> RequestHandle:
        """Queue a request and return its handle at once. Raises :class:`UnknownAdapterError`,
        :class:`QueueFullError`, :class:`PromptTooLongError` or :class:`InvalidRequestError` without
        queueing it."""
        if not isinstance(req, GenerationRequest):
            raise InvalidRequestError(f"expected a GenerationRequest, got {type(req).__name__}", field="request")
        req.validate()
        bad = [i for i in req.prompt_ids if i >= self.vocab_size]
        if bad:
            raise InvalidRequestError(f"field 'prompt_ids': token id {bad[0]} is outside the vocabulary "
                                      f"(0..{self.vocab_size - 1})", field="prompt_ids")
        entry = None
        if req.adapter is not None and req.adapter != self.base_name:
            entry = self.adapters.get(req.adapter)
        room = self.max_context - (entry.virtual_length if entry is not None else 0)
        if len(req.prompt_ids) >= room:
            prefix = (f" after adapter {req.adapter!r}'s {self.max_context - room} virtual tokens"
                      if room < self.max_context else "")
            raise PromptTooLongError(
                f"the prompt has {len(req.prompt_ids)} tokens but the context holds {self.max_context} "
                f"(max_context){prefix}, so at most {room - 1} prompt tokens leave room for one new token")
        handle = RequestHandle(req.request_id)
        with self.adapters.lock:
            if entry is not None:
                entry.queued += 1
        try:
            self.queue.push(req, handle, entry, len(req.prompt_ids) + (entry.prompt_length if entry is not None else 0))
        except ServeError:
            if entry is not None:
                self._release(entry, running=False)
            raise
        self._notify()
        return handle

    def generate(self, req: GenerationRequest) -> GenerationResult:
        """Submit and wait for the result. Without :meth:`start`, the calling thread runs the steps."""
        handle = self.submit(req)
        if self._thread is None:
            while not handle.done:
                self._step()
        return handle.result()

    # -- adapters -----------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Check, read and register the adapter directory ``path`` as ``name`` (in the calling
        thread; it lands in host memory and reaches the device when a request needs it). Loading a
        name again replaces it for new requests; requests already submitted keep the old one.
        Raises :class:`InvalidAdapterError` or :class:`InvalidRequestError` (a bad name)."""
        if not isinstance(name, str) or not name or "." in name or "/" in name or name == self.base_name:
            raise InvalidRequestError(f"field 'lora_name': an adapter name must be a non-empty string without "
                                      f"'.' or '/', other than the base model's name {self.base_name!r}; got {name!r}",
                                      field="lora_name")
        self.adapters.register(name, path)
        self._notify()

    def unload_adapter(self, name: str) -> None:
        """Unregister ``name`` (:class:`UnknownAdapterError` if it is not loaded). New requests for it
        are refused; requests already submitted for it finish with it, then it leaves every tier."""
        self.adapters.unregister(name)
        self._notify()

    def adapter_names(self) -> list[str]:
        """The registered adapters' names."""
        return self.adapters.names()

    @contextlib.contextmanager
    def _between_steps_unmerged(self) -> Iterator[None]:
        """Hold the decode loop between two steps, with the base weights unmerged (the merge policy
        merges again at the next step if it still should)."""
        with self._step_lock:
            if self.bank.merged is not None:
                self.bank.unmerge()
                self._counters["unmerges"] += 1
            yield

    # -- the decode loop -------------------------------------------------------------------------------
    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                busy = self._step()
            except Exception as e:  # noqa: BLE001 -- a failed step fails its requests, never the loop
                self._fail_running(e)
                busy = False
            if not busy:
                with self._wake:
                    self._wake.wait(timeout=0.05)

    def _step(self) -> bool:
        """One iteration (see the module docstring); False when there was nothing to do."""
        with self._step_lock, torch.no_grad():
            self.adapters.maintain()
            self._drop_failed_waiting()
            self._apply_merge_policy()
            new = self.queue.take(self.max_batch - len(self.rows), self._admit, self.prefill_tokens)
            admitted = [w for w in new if not w.handle.cancelled]
            for w in new:
                if w.handle.cancelled:
                    self._finish_waiting_cancelled(w)
            if self._fusable(admitted):
                if admitted or self.rows:
                    self._fused_step(admitted)
            else:
                self._separate_calls(admitted)
            if not self.rows and not len(self.queue):
                self.kv.clear()
            return bool(self.rows) or bool(new)

    def _separate_calls(self, admitted: list[Waiting]) -> None:
        """A step as one prefill call per group of similar prompt lengths, then one decode call."""
        # A row whose gate averages over its positions must not be padded in its prefill.
        groups = unpadded_where_needed(length_groups(admitted), lambda w: w.entry is not None and w.entry.gated)
        for k, group in enumerate(groups):
            try:
                self._prefill(group)
            except BaseException as e:  # the later groups never got rows: they fail here too
                for w in (w for g in groups[k + 1:] for w in g):
                    if w.entry is not None:
                        self._release(w.entry, running=True)
                    self._counters["requests_failed"] += 1
                    w.handle._fail(e)
                raise
        if self.rows:
            self._decode()

    def _admit(self, item: Waiting) -> bool:
        """Whether ``item`` can join now: its adapter is (made) resident on the device. It counts as
        running at once, so admitting the next one cannot evict its adapter."""
        entry = item.entry
        if entry is None:
            return True
        if not self.adapters.ensure_device(entry):
            return False
        with self.adapters.lock:
            entry.queued -= 1
            entry.running += 1
        return True

    def _row_routes(self, rows: list[_Row] | None = None) -> tuple[list[int], list[str | None] | None]:
        rows = self.rows if rows is None else rows
        slots = [r.slot for r in rows]
        routed = [r.routed for r in rows]
        return slots, (routed if any(n is not None for n in routed) else None)

    def _new_row(self, w: Waiting) -> _Row:
        """The running row of an admitted request (before its prefill)."""
        entry: AdapterEntry | None = w.entry
        slot, routed, virtual = 0, None, None
        if entry is not None:
            slot = entry.slot or 0
            routed = entry.key if entry.kind == "routed" else None
            virtual = entry.virtual
        req = w.request
        seed = req.seed if req.seed is not None else random.getrandbits(62)
        text = TextTracker(self.tokenizer, req.prompt_ids, req.stop)
        length = len(req.prompt_ids) + (entry.virtual_length if entry is not None else 0)
        return _Row(w, slot, routed, virtual, length, 0, seed % (1 << 62), text)

    def _fusable(self, admitted: list[Waiting]) -> bool:
        """Whether this step can be one fused call: fused steps work on this model, and every running
        and admitted row is a base row or a bank (LoRA-family) row without virtual tokens."""
        return (self.fused_steps and all(r.routed is None and r.virtual is None for r in self.rows)
                and all(w.entry is None or (w.entry.kind == "bank" and w.entry.virtual is None) for w in admitted))

    def _fused_step(self, admitted: list[Waiting]) -> None:
        """One packed model call (:mod:`~peftlab.serve.fused`): the next token of every running row
        and the first token of every admitted request."""
        groups = length_groups(admitted)  # prompts of similar length attend as one padded block
        admitted = [w for group in groups for w in group]
        running, new = self.rows, [self._new_row(w) for w in admitted]
        self.rows = running + new  # before the call: if it fails, these fail with the others
        logits = self._fused_logits([r.length for r in running], [r.last for r in running],
                                    [[w.request.prompt_ids for w in group] for group in groups], [r.slot for r in self.rows])
        if running:
            self._counters["steps"] += 1
        if new:
            self._counters["prefill_calls"] += 1
        self._counters["fused_calls"] += 1
        self._last_batch = len(self.rows)
        for r in running:
            r.length += 1
        self._emit(self.rows, logits, steps=[len(r.text.ids) for r in running] + [0] * len(new))
        self._pack()

    def _fused_logits(self, lengths: list[int], last: list[int], prompt_groups: list[list[list[int]]],
                      slots: list[int]) -> torch.Tensor:
        """Logits (n + g, vocab) of one fused call: decode rows 0..n−1 (cache ``lengths``, input
        tokens ``last``), then the prompts of ``prompt_groups`` (groups whose attention is one padded
        block each) prefilled into rows n..n+g−1; ``slots``: each row's bank row."""
        n = len(lengths)
        prompts = [p for group in prompt_groups for p in group]
        step = FusedStep.plan(lengths, [[len(p) for p in group] for group in prompt_groups], self.device, self._dtype)
        ids = torch.tensor(last + [t for p in prompts for t in p], device=self.device).view(1, -1)
        token_slots = slots[:n] + [s for s, p in zip(slots[n:], prompts) for _ in p]
        # A 4-D mask makes transformers use it as it is; the fused attention builds its own per request.
        mask = torch.zeros(1, 1, 1, 1, dtype=self._dtype, device=self.device)
        token = _KEEP.set(step.keep)
        try:
            with fused_call(self.model, self.kv, step):
                return self._forward(ids, step.token_columns.view(1, -1), mask, token_slots, None, per_token=True)
        finally:
            _KEEP.reset(token)

    def _prefill(self, group: list[Waiting]) -> None:
        rows = [self._new_row(w) for w in group]
        start = len(self.rows)
        self.rows.extend(rows)  # before the call: if it fails, these fail with the others
        slots, routed_names = self._row_routes(rows)
        virtuals = [r.virtual for r in rows] if any(r.virtual is not None for r in rows) else None
        logits = self._prefill_logits([w.request.prompt_ids for w in group], start, slots, routed_names, virtuals)
        self._counters["prefill_calls"] += 1
        self._emit(rows, logits, steps=[0] * len(rows))
        self._pack()

    def _prefill_logits(self, prompts: list[list[int]], start: int, slots: list[int],
                        routed: list[str | None] | None, virtuals: list[VirtualInput | None] | None = None) -> torch.Tensor:
        """Last-position logits (g, vocab) of right-padded prompts written into cache rows
        start..start+g-1: row b's prompt after its soft prompt's l_b virtual tokens (prefilled as
        tokens 0..l_b−1), all after its prefix's p_b cache columns (positions p_b + j), if any."""
        virtuals = virtuals or [None] * len(prompts)
        soft = [0 if v is None else v.prompt_length for v in virtuals]
        g, T = len(prompts), max(s + len(p) for s, p in zip(soft, prompts))
        ids = torch.full((g, T), self._pad, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, soft[i] : soft[i] + len(p)] = torch.tensor(p)
        lengths = torch.tensor([s + len(p) for s, p in zip(soft, prompts)], device=self.device)
        positions = torch.arange(T, device=self.device).expand(g, T)
        mask = prefill_mask(lengths, T, self._dtype)
        prefixes = [None if v is None else v.prefix for v in virtuals]
        if any(p is not None for p in prefixes):
            starts = torch.tensor([0 if v is None else v.prefix_length for v in virtuals], device=self.device)
            positions = positions + (starts - _shifts(virtuals, self.device)).view(g, 1)
            mask = prefixed_prefill_mask(lengths, starts, T, self._dtype)
        gates = CallGates.of([None if v is None else v.gates for v in virtuals], self.device)
        self.kv.begin_prefill(start, g, T, prefixes if any(p is not None for p in prefixes) else None, gates)
        token = _KEEP.set(torch.arange(g, device=self.device) * T + lengths - 1)
        try:
            with soft_prompts_in(self.model.get_input_embeddings(), virtuals):
                out = self._forward(ids.to(self.device), positions, mask, slots, routed)
        finally:
            _KEEP.reset(token)
            self.kv.end()
        return out

    def _decode_logits(self, last: torch.Tensor, lengths: torch.Tensor, slots: list[int],
                       routed: list[str | None] | None, gates: CallGates | None = None,
                       shifts: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of one new token per row, written at column lengths[b], at position lengths[b] −
        shifts[b] (a prefix with offset_positions=false numbers its tokens from 0)."""
        n = last.shape[0]
        columns = int(lengths.max()) + 1
        positions = lengths if shifts is None else lengths - shifts
        self.kv.begin_decode(n, lengths, columns, gates)
        try:
            return self._forward(last.view(n, 1), positions.view(n, 1), decode_mask(lengths, columns, self._dtype),
                                 slots, routed)
        finally:
            self.kv.end()

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, slots: list[int],
                 routed: list[str | None] | None, per_token: bool = False) -> torch.Tensor:
        kw = {self._cache_arg: self.kv, "use_cache": True, "attention_mask": mask, "position_ids": positions}
        with self.bank.call(slots, per_token=per_token):
            out = self.pm(input_ids=ids, adapter_names=routed, **kw)
        return out.logits[:, -1]

    def _decode(self) -> None:
        rows = self.rows
        lengths = torch.tensor([r.length for r in rows], device=self.device)
        last = torch.tensor([r.last for r in rows], device=self.device)
        slots, routed = self._row_routes()
        gates = CallGates.of([None if r.virtual is None else r.virtual.gates for r in rows], self.device)
        logits = self._decode_logits(last, lengths, slots, routed, gates, _shifts([r.virtual for r in rows], self.device))
        self._counters["steps"] += 1
        self._last_batch = len(rows)
        for r in rows:
            r.length += 1
        self._emit(rows, logits, steps=[len(r.text.ids) for r in rows])
        self._pack()

    def _emit(self, rows: list[_Row], logits: torch.Tensor, steps: list[int]) -> None:
        """Sample each row's token, stream it, and mark rows that are done."""
        reqs = [r.request for r in rows]
        tokens = next_tokens(
            logits,
            torch.tensor([q.temperature for q in reqs], device=logits.device),
            torch.tensor([q.top_p for q in reqs], device=logits.device),
            torch.tensor([r.seed for r in rows], device=logits.device),
            torch.tensor(steps, device=logits.device),
        ).tolist()
        now = time.monotonic()
        self._count_tokens(now, len(rows))
        for r, tok in zip(rows, tokens):
            req = r.request
            if r.item.handle.cancelled:
                r.finish = "cancelled"
                continue
            if not r.text.ids and not r.first_token_s:
                r.first_token_s = now - r.item.arrived
            if tok in self._eos:
                r.finish = "stop"
                continue
            r.last = tok
            text = r.text.add(tok)
            r.item.handle._emit(TokenEvent(tok, text))
            if r.text.stopped:
                r.finish = "stop"
            elif len(r.text.ids) >= req.max_tokens or r.length + 1 >= self.max_context:
                r.finish = "length"

    def _pack(self) -> None:
        """Finish done rows and pack the others at the top of the batch."""
        done = [i for i, r in enumerate(self.rows) if r.finish is not None or r.item.handle.cancelled]
        if not done:
            return
        for i in done:
            self._complete(self.rows[i])
        keep = [i for i in range(len(self.rows)) if i not in set(done)]
        n = len(keep)
        holes = [i for i in done if i < n]
        movers = [i for i in keep if i >= n]
        self.kv.move_rows(movers, holes)
        new_rows = self.rows[:n]
        for src, dst in zip(movers, holes):
            new_rows[dst] = self.rows[src]
        self.rows = new_rows

    def _complete(self, row: _Row) -> None:
        req, item = row.request, row.item
        if row.finish is None:
            row.finish = "cancelled"
        tail = row.text.finish() if row.finish == "length" else ""
        if tail:
            item.handle._emit(TokenEvent(row.text.ids[-1], tail))
        end = time.monotonic()
        missed = req.deadline is not None and end > req.deadline
        result = GenerationResult(
            request_id=req.request_id, token_ids=list(row.text.ids), text=row.text.released, finish_reason=row.finish,
            prompt_tokens=len(req.prompt_ids), completion_tokens=len(row.text.ids),
            first_token_s=row.first_token_s or (end - item.arrived), total_s=end - item.arrived, deadline_missed=missed)
        if item.entry is not None:
            self._release(item.entry, running=True)
        self._counters["requests_done"] += 1
        self._counters["requests_cancelled"] += int(row.finish == "cancelled")
        self._counters["deadline_missed"] += int(missed)
        self.queue.completed()
        item.handle._finish(result)

    def _finish_waiting_cancelled(self, item: Waiting) -> None:
        if item.entry is not None:
            self._release(item.entry, running=False)
        self._counters["requests_cancelled"] += 1
        now = time.monotonic()
        req = item.request
        item.handle._finish(GenerationResult(req.request_id, [], "", "cancelled", len(req.prompt_ids), 0,
                                             now - item.arrived, now - item.arrived, False))

    def _release(self, entry: AdapterEntry, running: bool) -> None:
        with self.adapters.lock:
            if running:
                entry.running -= 1
            else:
                entry.queued -= 1

    def _fail(self, item: Waiting, error: BaseException) -> None:
        if item.entry is not None:
            self._release(item.entry, running=False)
        self._counters["requests_failed"] += 1
        item.handle._fail(error)

    def _drop_failed_waiting(self) -> None:
        for item in self.queue.remove_if(lambda w: w.entry is not None and w.entry.error is not None):
            self._fail(item, item.entry.error)

    def _fail_running(self, error: BaseException) -> None:
        """A step raised: fail every running request with the cause and start over with an empty batch."""
        for row in self.rows:
            if row.item.entry is not None:
                self._release(row.item.entry, running=True)
            self._counters["requests_failed"] += 1
            row.item.handle._fail(error)
        self.rows = []
        self.kv.clear()

    def _apply_merge_policy(self) -> None:
        if self.policy is None:
            if self.bank.merged is not None:
                self.bank.unmerge()
            return
        counts: dict[Any, int] = {}
        for entry in [r.item.entry for r in self.rows] + [w.entry for w in self.queue.snapshot()]:
            counts[entry] = counts.get(entry, 0) + 1
        if any(e is not None and e.kind == "routed" for e in counts):
            # Routed deltas may read the base weights in their forward (DoRA's norm): never merged under them.
            counts = {}
        mergeable = {e for e in counts if e is not None and e.slot is not None}
        merged_entry = next((e for e in counts if e is not None and e.slot is not None and e.slot == self.bank.merged), None)
        target = self.policy.decide(counts, merged_entry, mergeable)
        if target is None:
            if self.bank.merged is not None:
                self.bank.unmerge()
                self._counters["unmerges"] += 1
        elif target.slot != self.bank.merged and self.bank.can_merge():
            if self.bank.merged is not None:
                self._counters["unmerges"] += 1
            self.bank.merge(target.slot)
            self._counters["merges"] += 1

    # -- numbers ---------------------------------------------------------------------------------------
    def _count_tokens(self, now: float, n: int) -> None:
        self._counters["tokens_generated"] += n
        self._recent_tokens.append((now, n))
        while self._recent_tokens and self._recent_tokens[0][0] < now - 10.0:
            self._recent_tokens.popleft()

    def stats(self) -> dict[str, Any]:
        """Counters and gauges: queue_length, running, batch_size (last decode step), tokens_per_s
        (over the last 10 s), requests_done, requests_failed, requests_cancelled (a client's
        ``cancel()``, e.g. a streaming client that went away), deadline_missed, cache_hits (adapter on
        the device when needed), host_hits (moved from host memory), cache_misses (read back from
        disk), device_adapters, host_adapters, registered_adapters, merged_adapter, host_to_device_ms
        (median of recent moves), kv_cache_bytes, bank_bytes, steps, prefill_calls, tokens_generated,
        fused_steps (whether steps may be fused; if not, unfused_reason says why) and fused_calls
        (steps that were)."""
        now = time.monotonic()
        window = [(t, n) for t, n in list(self._recent_tokens) if t >= now - 10.0]
        span = (now - window[0][0]) if window else 0.0
        tokens = sum(n for _, n in window)
        merged = self.adapters.merged_name()
        promote = sorted(self.adapters.promote_ms[-64:])
        return {
            "queue_length": len(self.queue),
            "running": len(self.rows),
            "batch_size": self._last_batch,
            "tokens_per_s": tokens / span if span > 0 else 0.0,
            **self._counters,
            "cache_hits": self.adapters.hits,
            "host_hits": self.adapters.host_hits,
            "cache_misses": self.adapters.misses,
            "device_adapters": self.adapters.device_count(),
            "host_adapters": self.adapters.host_count(),
            "registered_adapters": len(self.adapters.registry),
            "host_adapter_bytes": self.adapters.host_bytes,
            "merged_adapter": merged,
            "host_to_device_ms": promote[len(promote) // 2] if promote else None,
            "kv_cache_bytes": self.kv.nbytes(),
            "bank_bytes": self.bank.nbytes(),
            "fused_steps": self.fused_steps,
            "unfused_reason": self.unfused_reason,
        }


def _shifts(virtuals: list[VirtualInput | None], device: torch.device) -> torch.Tensor:
    """Per row, cache columns minus the position of its tokens (:attr:`VirtualInput.position_shift`)."""
    return torch.tensor([0 if v is None else v.position_shift for v in virtuals], device=device)


def _keep_last_positions(module: nn.Module, args: tuple) -> tuple | None:
    """LM head pre-hook: during a prefill or fused call, keep the tokens whose logits are wanted
    (``_KEEP``, indices into the call's flattened rows × positions), as (k, 1, hidden)."""
    keep = _KEEP.get()
    if keep is None:
        return None
    x = args[0]
    return (x.reshape(-1, x.shape[-1])[keep.to(x.device)].unsqueeze(1), *args[1:])


def _base_name(model: nn.Module) -> str:
    """The zoo name, else the last part of the config's ``_name_or_path``, else the class name."""
    zoo = getattr(model, "peftlab_zoo", None)
    if zoo is not None and getattr(zoo, "name", None) not in (None, "directory"):
        return zoo.name
    path = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return os.path.basename(os.path.normpath(path)) if path else type(model).__name__


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
