"""The adapter container: the user's model plus named adapters attached by hooks.

``PeftModel`` never restructures the base model: deltas live in ``pm.adapter_modules`` and reach the
base through one :class:`~peftlab.core.dispatch.Dispatcher` per hooked module. ``pm.model`` is the
user's own object, with its own class and ``state_dict`` keys; ``unload()`` removes every hook and
gives it back unchanged.

A PEFT user's calls have PEFT's meaning (``save_pretrained``, ``from_pretrained``, ``load_adapter``,
``print_trainable_parameters``, ``disable_adapter``...); any other name the container lacks is the
base model's, except the deny-list :data:`NOT_FORWARDED` (names that would save, load or upload the
base instead of the adapter), which raises :class:`NotForwardedError`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from peftlab.core import io, signatures
from peftlab.core.accounting import adapter_report
from peftlab.core.composition import Composition, is_foldable
from peftlab.core.config import (
    AdapterConfig, BaseChangingConfig, ConfigError, HybridConfig, UnionConfig, as_config, config_parts, is_union, union_parts,
)
from peftlab.core.delta import HeadCopy, RecentCache
from peftlab.core.dispatch import AdapterState, Dispatcher, Routing
from peftlab.core.follow import BaseRef, adapter_dtype, follow, refuse_meta
from peftlab.core.layers import add_to_param
from peftlab.core.model_calls import checkpointing_enabled, enable_checkpointing
from peftlab.core.registry import get_method
from peftlab.core.targeting import TargetError, _nearest, entry_matches
from peftlab.core.training import TrainingHooks, total_regularizer

# A placed adapter: (union part index, module name or "" for the model level, delta)
Placement = list[tuple[int, str, nn.Module]]

_SITE_ORDER = {"parallel": 0, "input": 1, "output": 2, "model": 3}
_log = logging.getLogger("peftlab")


class NotForwardedError(AttributeError, NotImplementedError):
    """A name that ``PeftModel`` refuses to pass on to the base model, because there it would save,
    load or upload the base instead of the adapter. The message says what to call instead. (An
    ``AttributeError``, so ``hasattr`` stays False, and a ``NotImplementedError``.)"""


#: Names that ``PeftModel.__getattr__`` does not forward to the base model (the deny-list), with
#: what to call instead. Every other name the container lacks is the base model's (``pm.config``,
#: ``pm.device``, ``pm.get_input_embeddings()``...). ``save_pretrained``, ``from_pretrained``,
#: ``load_adapter``, ``add_adapter``, ``set_adapter``, ``delete_adapter``, ``active_adapter(s)``
#: and ``disable_adapter(s)`` are the container's own, with PEFT's meaning.
NOT_FORWARDED: dict[str, str] = {
    "push_to_hub": (
        "peftlab does not upload (the base model's push_to_hub would upload the base weights, not the "
        "adapter). Write the adapter files with pm.save_pretrained(directory) and upload that directory, "
        "e.g. huggingface_hub.upload_folder(repo_id=..., folder_path=directory)"
    ),
    "save_model": (
        "PeftModel has no save_model (that is a Trainer method); write the adapter files with "
        "pm.save_pretrained(directory), or one adapter with pm.save(directory, adapter_name=...)"
    ),
    "enable_adapters": (
        "transformers' enable_adapters acts on its own PEFT integration, not on peftlab's adapters; "
        "use pm.enable_adapter_layers()"
    ),
    "get_adapter_state_dict": (
        "transformers' get_adapter_state_dict reads its own PEFT integration, not peftlab's adapters; "
        "use pm.adapter_tensors(adapter_name) (the tensors under their file keys)"
    ),
}

#: Keyword arguments of PEFT's / transformers' ``save_pretrained`` that ``PeftModel.save_pretrained``
#: accepts and ignores: files are always safetensors, ``state_dict`` is not read (the adapters' own
#: tensors are written), sharding, variants and hub tokens do not apply to adapter files.
_IGNORED_SAVE_KWARGS = frozenset({
    "state_dict", "save_embedding_layers", "max_shard_size", "variant", "token", "use_auth_token",
    "save_function", "save_peft_format", "safe_serialization", "convert_pissa_to_lora", "commit_message",
})
#: Keyword arguments of PEFT's ``from_pretrained`` / ``load_adapter`` accepted and ignored (hub
#: download options: peftlab reads local directories; dtype and memory options of PEFT's loader).
_IGNORED_LOAD_KWARGS = frozenset({
    "revision", "token", "use_auth_token", "cache_dir", "local_files_only", "force_download", "proxies",
    "autocast_adapter_dtype", "ephemeral_gpu_offload", "low_cpu_mem_usage", "torch_device",
    "ignore_mismatched_sizes",
})


def _check_kwargs(call: str, kwargs: dict[str, Any], accepted: frozenset[str]) -> None:
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(f"{call}() got unexpected keyword arguments {unknown}; it accepts and ignores {sorted(accepted)}")


def _adapter_dir(model_id: str | os.PathLike, subfolder: str | None) -> str:
    """The local directory of ``model_id`` (joined with ``subfolder``, as PEFT does)."""
    path = os.path.join(os.fspath(model_id), subfolder) if subfolder else os.fspath(model_id)
    if not os.path.isdir(path):
        raise io.AdapterFileError(
            f"adapter directory {path!r} does not exist. peftlab reads adapter directories on disk and never "
            "downloads: for a Hub repository, fetch it first (huggingface_hub.snapshot_download(repo_id)) "
            "and pass the directory it returns"
        )
    return path


def build_placement(model: nn.Module, cfg: AdapterConfig | UnionConfig) -> Placement:
    """Create (but do not attach) every delta an adapter config asks for (a hybrid: its parts'). The
    model is not changed."""
    placement: Placement = []
    if isinstance(cfg, HybridConfig):
        get_method(cfg.method).check_applicable(model)  # the hybrid's own needs, under its own name
    for part, pcfg in enumerate(union_parts(cfg)):
        if isinstance(pcfg, BaseChangingConfig):
            raise ConfigError(
                f"{pcfg.method} changes the base model, so it is given to peftlab.apply(model, ...) on a model "
                f"without adapters, not added or loaded as an adapter ({pcfg.to_string()})")
        spec = get_method(pcfg.method)
        spec.check_applicable(model)
        for module_name, delta in spec.build(model, pcfg).items():
            placement.append((part, module_name, delta))
        for head in pcfg.modules_to_save or []:
            hits = [(n, m) for n, m in model.named_modules() if n and entry_matches(head, n)]
            if not hits:
                near = _nearest(head, [n for n, _ in model.named_modules() if n])
                raise TargetError(f"modules_to_save: {head!r} matches no module. Nearest module names: {', '.join(near)}")
            # Keep only the outermost matches (a head that contains another match).
            names = [n for n, _ in hits if not any(n.startswith(o + ".") for o, _ in hits)]
            for n in names:
                placement.append((part, n, HeadCopy(model.get_submodule(n))))
    for _, module_name, delta in placement:
        _match_device(delta, model.get_submodule(module_name) if module_name else model)
    return placement


def _match_device(delta: nn.Module, base: nn.Module) -> None:
    now = BaseRef(base).current()  # the first float tensor (a 4-bit weight: the dtype it stands for)
    if now is None:
        return
    # Adapters of a half-precision base stay float32 (their forward casts), as PEFT does by default;
    # the same rule applies when the base is cast later (core/follow.py).
    delta.to(device=now[0], dtype=adapter_dtype(now[1]))


#: Argument names that carry a call's batch (its first dimension), most specific first.
_MAIN_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features", "inputs")


def _batch_size(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[int, str, tuple] | None:
    """(rows, argument, shape) of a call's main input: the model's ``main_input_name``, input_ids,
    inputs_embeds, pixel_values, ..., else the first tensor argument; None if the call has none."""
    main = getattr(model, "main_input_name", None)
    for key in ((main,) if isinstance(main, str) else ()) + _MAIN_INPUTS:
        t = kwargs.get(key)
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t.shape[0], key, tuple(t.shape)
    for i, t in enumerate(args):
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t.shape[0], f"positional argument {i}", tuple(t.shape)
    for key, t in kwargs.items():
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return t.shape[0], key, tuple(t.shape)
    return None


def _module_key(module_name: str, part: int, taken: Iterable[str]) -> str:
    key = (module_name.replace(".", "/") or "<model>") + (f"#{part}" if part else "")
    while key in taken:
        key += "'"
    return key


def adapters_attached_to(model: nn.Module) -> list[str]:
    """Names of the adapters some PeftModel has hooked into ``model`` (read from the hooks
    themselves, so a container that was dropped without ``unload()`` is found too)."""
    names: list[str] = []
    for module in model.modules():
        for hook in (*module._forward_hooks.values(), *module._forward_pre_hooks.values()):
            owner = getattr(hook, "__self__", None)
            if isinstance(owner, Dispatcher):
                names += [n for n in owner.deltas if n not in names]
    return names


class PeftModel(nn.Module):
    """A base model with named adapters. Call it exactly like the base model."""

    def __new__(cls, model: nn.Module | None = None, *args: Any, **kwargs: Any) -> "PeftModel":
        # An instance of PeftModel[<base class>]: forward / generate signed with the base's own
        # parameters plus adapter_names, for code that reads signatures (transformers.Trainer).
        if cls is PeftModel and isinstance(model, nn.Module) and not isinstance(model, PeftModel):
            cls = signatures.signed_subclass(PeftModel, type(model))
        return super().__new__(cls)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # pickle / copy: recreate PeftModel[<base class>] from the base class (core/signatures.py).
        reduced = super().__reduce_ex__(protocol)
        base_cls = type(self).__dict__.get("_signed_for")
        if base_cls is None or not isinstance(reduced, tuple) or reduced[1][:1] != (type(self),):
            return reduced
        return (signatures.rebuild, (PeftModel, base_cls), *reduced[2:])

    def __init__(self, model: nn.Module):
        super().__init__()
        if isinstance(model, PeftModel):
            raise TypeError("model is already a PeftModel; call add_adapter on it instead")
        attached = adapters_attached_to(model)
        if attached:
            # A second container would stack its hooks on the first one's: both would change, and
            # unloading one would leave the model adapted by the other.
            raise ValueError(
                f"this {type(model).__name__} already carries adapters {attached} of another PeftModel; "
                "add to that one with pm.add_adapter(name, config) and pm.set_adapter(name), "
                "or call pm.unload() first to get the plain model back"
            )
        self.model = model
        self.adapter_modules = nn.ModuleDict()
        self.configs: dict[str, AdapterConfig | UnionConfig] = {}
        self.placements: dict[str, Placement] = {}
        self._trainable: dict[str, dict[str, bool]] = {}
        # Methods that act during training (core/training.py): their hooks and step count per adapter.
        self._training: dict[str, list[TrainingHooks]] = {}
        self._steps: dict[str, int] = {}
        self._routings = RecentCache(size=8)  # adapter_names -> Routing, for repeated calls
        self._merge_log: dict[str, list[tuple[nn.Module, nn.Module, dict[str, torch.Tensor] | None]]] = {}
        self._merge_errors: dict[str, dict[str, float]] = {}  # merge into 4-bit layers (merge_report)
        self._state = AdapterState()
        self._dispatchers: dict[str, Dispatcher] = {}
        self._base_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)

    def __getattr__(self, name: str) -> Any:
        """A name the container lacks is the base model's, except the deny-list :data:`NOT_FORWARDED`
        (names that would save, load or upload the base instead of the adapter), which raises
        :class:`NotForwardedError` saying what to call."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            if name in NOT_FORWARDED:
                raise NotForwardedError(f"PeftModel.{name}: {NOT_FORWARDED[name]}") from None
            return getattr(self.model, name)

    # -- adapters -------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        """Names of every adapter, in the order they were added."""
        return list(self.configs)

    @property
    def active_adapters(self) -> list[str]:
        """The adapters the next call uses, in order."""
        return list(self._state.active)

    @property
    def active_composition(self) -> Composition | None:
        """The block given to ``set_adapter`` (``peftlab.Stack`` / ``Parallel`` / ``Average``), or
        None when names were activated (a list combines as ``Stack`` of those names)."""
        return self._state.composition

    @property
    def active_adapter(self) -> str | None:
        """The first active adapter (PEFT's name); None when no adapter is active."""
        return self._state.active[0] if self._state.active else None

    @property
    def peft_config(self) -> dict[str, AdapterConfig | UnionConfig]:
        """{adapter name: its config} (PEFT's name; the configs are peftlab's, e.g. ``LoraConfig.r``)."""
        return dict(self.configs)

    def add_adapter(self, adapter_name: str, config: "AdapterConfig | UnionConfig | str | dict") -> "PeftModel":
        """Create and attach a new adapter (inactive until ``set_adapter``)."""
        self._check_new_name(adapter_name)
        cfg = as_config(config)
        self._install(adapter_name, cfg, build_placement(self.model, cfg))
        return self

    def _check_new_name(self, adapter_name: str) -> None:
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter name must be a non-empty string without '.', got {adapter_name!r}")
        if adapter_name in self.configs:
            raise ValueError(
                f"an adapter named {adapter_name!r} exists already (adapters: {self.adapters}); "
                f"choose another name or delete_adapter({adapter_name!r}) first"
            )

    def attach(self, adapter_name: str, config: "AdapterConfig | UnionConfig | str | dict", placement: Placement) -> None:
        """Attach an adapter whose deltas were built and filled elsewhere (:func:`build_placement`
        and ``io.load_into_placement``, e.g. in a loader thread, so attaching costs no file reading);
        it is inactive until ``set_adapter`` or routed per row with ``adapter_names``."""
        self._check_new_name(adapter_name)
        self._install(adapter_name, as_config(config), placement)

    def _install(self, adapter_name: str, cfg: AdapterConfig | UnionConfig, placement: Placement) -> None:
        store = nn.ModuleDict()
        for part, module_name, delta in placement:
            store[_module_key(module_name, part, store.keys())] = delta
        self.adapter_modules[adapter_name] = store
        self.configs[adapter_name] = cfg
        self.placements[adapter_name] = placement
        self._trainable[adapter_name] = {n: p.requires_grad for n, p in store.named_parameters()}
        for p in store.parameters():
            p.requires_grad_(False)
        for _, module_name, delta in placement:
            if delta.site == "model":
                continue
            disp = self._dispatchers.get(module_name)
            if disp is None:
                disp = self._dispatchers[module_name] = Dispatcher(
                    module_name, self.model.get_submodule(module_name), self._state
                )
            disp.add(adapter_name, delta)
        hooks = []
        for part, pcfg in enumerate(union_parts(cfg)):
            spec = get_method(pcfg.method)
            if spec.training is not None:
                # The method's own deltas: a head copied for modules_to_save is core's, not the method's.
                own = {m: d for k, m, d in placement if k == part and not isinstance(d, HeadCopy)}
                hooks.append(spec.training(pcfg, own))
        if hooks:
            self._training[adapter_name] = hooks
            self._steps[adapter_name] = 0
        self._state.touch()

    def adapter_parameters(self, adapter_name: str) -> Iterator[tuple[nn.Parameter, bool]]:
        """``(parameter, trainable)`` for each parameter of an adapter, whether or not it is active.

        Looked up by name, so a delta that replaces its parameters after it was installed (a prefix
        dropping its MLP) stays consistent; a parameter added later counts as trainable."""
        flags = self._trainable[adapter_name]
        for n, p in self.adapter_modules[adapter_name].named_parameters():
            yield p, flags.get(n, True)

    def set_adapter(self, adapter_names: str | Sequence[str] | Composition, inference_mode: bool = False) -> None:
        """Activate one adapter, or several (their outputs are summed / applied in order), or a
        composition of blocks (``peftlab.Stack``, ``Parallel``, ``Average``; README "Combining adapters").

        Only the active adapters' parameters are trainable afterwards, as in PEFT (this also makes an
        adapter loaded with ``is_trainable=False`` trainable); ``inference_mode=True`` (PEFT's
        argument) leaves every adapter parameter frozen."""
        block = adapter_names if isinstance(adapter_names, Composition) else None
        names = block.names() if block is not None else [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._require(names)
        if self._state.merged and (set(names) != set(self._state.active) or not is_foldable(block)):
            raise RuntimeError(f"adapters {self._state.merged} are merged; unmerge() before switching adapters")
        model_level = [n for n in names if any(d.site == "model" for _, _, d in self.placements[n])]
        if model_level and not is_foldable(block):
            raise NotImplementedError(
                f"{block!r}: adapters {model_level} rewrite the model call (model-level site), which Parallel and "
                "Average cannot combine; activate them in a list or a Stack")
        for name in self._trainable:
            for p, trainable in self.adapter_parameters(name):
                p.requires_grad_(trainable and name in names and not inference_mode)
        self._state.active = names
        self._state.composition = block
        self._state.touch()

    def delete_adapter(self, adapter_name: str) -> None:
        """Detach and forget an adapter."""
        self._require([adapter_name])
        if adapter_name in self._state.merged:
            raise RuntimeError(f"adapter {adapter_name!r} is merged; unmerge() it before deleting it")
        if self._state.composition is not None and adapter_name in self._state.composition.names():
            raise ValueError(f"adapter {adapter_name!r} is part of the active composition {self._state.composition!r}; "
                             "set_adapter(...) something else before deleting it")
        for module_name, disp in list(self._dispatchers.items()):
            disp.remove(adapter_name)
            if not disp.deltas:
                disp.close()
                del self._dispatchers[module_name]
        del self.adapter_modules[adapter_name]
        for table in (self.configs, self.placements, self._trainable, self._training, self._steps):
            table.pop(adapter_name, None)
        self._state.active = [a for a in self._state.active if a != adapter_name]
        self._state.touch()

    def _require(self, names: Iterable[str]) -> None:
        for n in names:
            if n not in self.configs:
                raise KeyError(f"no adapter named {n!r}; adapters: {self.adapters}")

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """PEFT's name for :meth:`disable_adapters`: ``with pm.disable_adapter(): base_out = pm(**batch)``."""
        with self.disable_adapters():
            yield

    def disable_adapter_layers(self) -> None:
        """Turn every adapter off until :meth:`enable_adapter_layers` (PEFT's name); calls run the base alone."""
        if self._state.merged:
            raise RuntimeError(f"adapters {self._state.merged} are merged into the weights; unmerge() first")
        self._state.disabled = True
        self._state.touch()

    def enable_adapter_layers(self) -> None:
        """Turn the adapters back on after :meth:`disable_adapter_layers` (PEFT's name)."""
        self._state.disabled = False
        self._state.touch()

    @contextlib.contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """Run the base model alone inside the block."""
        if self._state.merged:
            raise RuntimeError(f"adapters {self._state.merged} are merged into the weights; unmerge() first")
        previous = self._state.disabled
        self._state.disabled = True
        self._state.touch()
        try:
            yield
        finally:
            self._state.disabled = previous
            self._state.touch()

    # -- calling --------------------------------------------------------------------------------
    def _follow_base(self, everywhere: bool = False) -> None:
        """Adapters follow the base model when the user moved or cast it (``core/follow.py``): the
        model-level deltas here, once per change of the model's reference tensor (every hooked
        module does the same for its own deltas at its next call); ``everywhere``: every
        dispatcher now too, whether or not its deltas are in use (before merging or unmerging)."""
        ref = self.__dict__.get("_model_base")
        if ref is None:
            ref = self.__dict__["_model_base"] = BaseRef(self.model)
        if ref.changed():
            st = self._state
            used = [] if st.disabled else st.routing.names if st.routing is not None else st.active
            used_deltas = [d for n in used if n in self.placements for _, _, d in self.placements[n]]
            now = ref.current()
            if now is not None and now[0].type == "meta":
                refuse_meta(used_deltas, "the model")  # before any layer runs
            deltas = [d for pl in self.placements.values() for _, _, d in pl if d.site == "model"]
            follow(deltas, ref, "the model", everywhere or any(d.site == "model" for d in used_deltas))
        if everywhere:
            for disp in self._dispatchers.values():
                disp.follow_base(in_use=True)

    @contextlib.contextmanager
    def _call_context(
        self, adapter_names: Sequence[str | None] | None, args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> Iterator[None]:
        """Set up one call: the per-row routing of ``adapter_names`` (its length checked against the
        batch size of the call's main input in ``args`` / ``kwargs`` before any layer runs), after
        the model-level deltas have followed the base (``_follow_base``)."""
        st = self._state
        if adapter_names is None:
            st.routing = None
        else:
            if st.merged:
                raise RuntimeError("per-row adapter_names cannot be used while adapters are merged; unmerge() first")
            if isinstance(adapter_names, str):
                raise TypeError(f"adapter_names must be a list with one adapter name per row, not the string "
                                f"{adapter_names!r} (to use one adapter for every row: pm.set_adapter({adapter_names!r}))")
            adapter_names = list(adapter_names)
            found = _batch_size(self.model, args, kwargs or {})
            if found is not None and found[0] != len(adapter_names):
                raise ValueError(
                    f"adapter_names has {len(adapter_names)} entries but the batch has {found[0]} rows "
                    f"({found[1]} has shape {found[2]}): give one adapter name (or None) per row")
            names = [n for n in dict.fromkeys(adapter_names) if n is not None and n != "__base__"]
            self._require(names)
            ref = next(iter(self.model.parameters()))
            key = (tuple(adapter_names), ref.device)
            routing = self._routings.get(key)
            if routing is None:
                # The same routing object for repeated calls (decoding step after step) lets the
                # deltas keep their per-row gathered weights between calls.
                index = {n: i for i, n in enumerate(names)}
                slot = torch.tensor([index.get(n, -1) if n is not None else -1 for n in adapter_names], device=ref.device)
                routing = Routing(names, slot)
                self._routings.put(key, routing)
            st.routing = routing
        try:
            self._follow_base()
        except BaseException:
            st.routing = None
            raise
        try:
            yield
        finally:
            # With activation checkpointing the backward pass re-runs the hooks, so the routing of a
            # training step must outlive the forward call; the next call replaces it.
            # The routing lives in a context variable (core/dispatch.AdapterState): this thread's only.
            keep = st.routing is not None and torch.is_grad_enabled() and checkpointing_enabled(self.model)
            if keep:
                st.keep_for_backward(st.routing)  # for autograd's thread, which never set one
            else:
                st.routing = None

    def _name_positional(self, fn: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """Model-site deltas rewrite named arguments (``input_ids``, ``attention_mask``, the cache...),
        so when one is in play, positional arguments are first given their names from ``fn``'s
        signature; otherwise the call passes through untouched."""
        st = self._state
        names = st.routing.names if st.routing is not None else st.active
        if not args or st.disabled or not any(
            d.site == "model" for n in names if n is not None and n in self.placements for _, _, d in self.placements[n]
        ):
            return args, kwargs
        sig = inspect.signature(fn)
        if any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values()):
            return args, kwargs  # nothing to name them by
        try:
            bound = sig.bind_partial(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{type(self.model).__name__}.{fn.__name__}: {e}") from e
        named = dict(bound.arguments)
        for name, p in sig.parameters.items():
            if p.kind is p.VAR_KEYWORD and name in named:
                named.update(named.pop(name))
        if "inputs" in named and fn.__name__ == "generate":  # generate(inputs) means the main input
            named[getattr(self.model, "main_input_name", "input_ids")] = named.pop("inputs")
        return (), named

    def _prepare_model_call(self, kwargs: dict[str, Any], generating: bool) -> dict[str, Any]:
        """Let the active model-site deltas (prefixes...) rewrite the call; per row when routed."""
        st = self._state
        if st.disabled:
            return kwargs
        if st.routing is None:
            for d in (d for n in st.active for _, _, d in self.placements[n] if d.site == "model"):
                if d.training is not self.model.training:
                    d.train(self.model.training)  # model-level deltas follow the base's mode too
                kwargs = d.prepare(self.model, kwargs, generating=generating)
            return kwargs
        slots = [[d for _, _, d in self.placements[n] if d.site == "model"] for n in st.routing.names]
        present = [d for s in slots for d in s]
        if not present:
            return kwargs
        for n in st.routing.names:
            for part in config_parts(self.configs[n]):
                spec = get_method(part.method)
                if "model" in spec.sites and not spec.per_row:
                    raise NotImplementedError(
                        f"adapter {n!r} ({spec.name}) cannot serve a mixed batch: {spec.name} rewrites the whole "
                        "model call and does not batch per row; run its rows in a separate call")
        cls = type(present[0])
        if any(type(d) is not cls for d in present):
            kinds = sorted({type(d).__name__ for d in present})
            raise NotImplementedError(f"a mixed batch cannot combine different model-level methods ({', '.join(kinds)})")
        for d in present:
            if d.training is not self.model.training:
                d.train(self.model.training)
        return cls.prepare_routed(slots, st.routing.slot, self.model, kwargs, generating)

    def forward(self, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        """Call the base model with the active adapters, or with one adapter per row
        (``adapter_names[i]`` for row i; ``None`` or ``"__base__"`` for the base model)."""
        with self._call_context(adapter_names, args, kwargs):
            args, kwargs = self._name_positional(self.model.forward, args, kwargs)
            kwargs = self._prepare_model_call(kwargs, generating=False)
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str | None] | None = None, **kwargs: Any) -> Any:
        """``model.generate`` with the active adapters (or one per row)."""
        with self._call_context(adapter_names, args, kwargs):
            args, kwargs = self._name_positional(self.model.generate, args, kwargs)
            kwargs = self._prepare_model_call(kwargs, generating=True)
            return self.model.generate(*args, **kwargs)

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        """Turn on activation checkpointing in the base model (non-reentrant by default, so frozen
        inputs still let gradients reach the adapters)."""
        checkpointing_kwargs = kwargs.pop("gradient_checkpointing_kwargs", None) or {"use_reentrant": False}
        enable_checkpointing(self.model, checkpointing_kwargs, **kwargs)
        if checkpointing_kwargs.get("use_reentrant", True):
            # Reentrant checkpointing only backpropagates into segments whose inputs need grad.
            self.model.enable_input_require_grads()

    # -- methods that act during training (core/training.py) ---------------------------------
    @property
    def needs_calibration(self) -> bool:
        """Whether an active adapter's method wants :meth:`calibrate` before training."""
        return any(h.needs_calibration for n in self._state.active for h in self._training.get(n, ()))

    def begin_training(self, total_steps: int | None = None) -> None:
        """Tell the active adapters' methods that training starts and how many optimizer steps it
        plans (AdaLoRA's budget schedule uses it when its config leaves ``total_step`` unset)."""
        for name in self._state.active:
            for h in self._training.get(name, ()):
                h.begin(total_steps)

    def regularizer(self) -> torch.Tensor:
        """Σ of the loss terms the active adapters' methods add (AdaLoRA's orthogonality penalty,
        ...): a 0-dim tensor, 0 when none adds one. Add it to the task loss before ``backward``."""
        like = next(self.adapter_modules.parameters(), None)
        if like is None:
            like = next(self.model.parameters())
        hooks = [h for n in self._state.active for h in self._training.get(n, ())]
        return total_regularizer(hooks, like.float() if not like.is_floating_point() else like)

    def on_step(self) -> None:
        """Tell the active adapters' methods that an optimizer step was taken (call it after
        ``optimizer.step()``, before ``zero_grad``: hooks such as AdaLoRA's read the gradients)."""
        for name in self._state.active:
            if name in self._training:
                self._steps[name] += 1
                for h in self._training[name]:
                    h.on_step(self._steps[name])
        self._state.touch()

    def calibrate(self, batches: Iterable[dict[str, Any]]) -> list[str]:
        """Give the active adapters' methods that need data before training (``needs_calibration``)
        a few batches of it; returns the names of the adapters calibrated."""
        batches = list(batches)
        done = []
        for name in self._state.active:
            hooks = [h for h in self._training.get(name, ()) if h.needs_calibration]
            for h in hooks:
                h.calibrate(self, batches)
            if hooks:
                done.append(name)
        return done

    def training_state(self, adapter_name: str) -> dict[str, Any]:
        """The step count and hook states of one adapter (what a checkpoint keeps to resume)."""
        return {"step": self._steps.get(adapter_name, 0),
                "hooks": [h.state_dict() for h in self._training.get(adapter_name, ())]}

    def load_training_state(self, adapter_name: str, state: dict[str, Any]) -> None:
        """Restore what :meth:`training_state` returned."""
        hooks = self._training.get(adapter_name, [])
        if len(state.get("hooks", [])) != len(hooks):
            raise ValueError(f"adapter {adapter_name!r}: the saved training state has {len(state.get('hooks', []))} "
                             f"hook states, this adapter has {len(hooks)}")
        if hooks:
            self._steps[adapter_name] = int(state.get("step", 0))
        for h, hs in zip(hooks, state["hooks"]):
            h.load_state_dict(hs)

    # -- merging --------------------------------------------------------------------------------
    def merge(self, adapter_names: Sequence[str] | None = None) -> dict[str, float]:
        """Fold adapters into the base weights: W <- W + ΔW for every mergeable delta.

        Merged adapters are skipped by the hooks, so outputs are unchanged (up to rounding). A
        4-bit base layer is dequantized, added to and requantized: returns {module: requantization
        error} for those (also in :attr:`merge_report`), empty for a float base."""
        names = list(adapter_names) if adapter_names is not None else list(self._state.active)
        self._require(names)
        block = self._state.composition
        if not is_foldable(block) and set(names) & set(block.names()):
            raise RuntimeError(
                f"merge() folds adapters one after another, which computes {block!r} only for a Stack; merge "
                "them into one adapter with peftlab.compose.merge(pm, names, weights, method='linear') and merge that")
        self._follow_base(everywhere=True)  # the deltas where the base is, if the model was moved or cast
        for name in names:
            if name in self._state.merged:
                continue
            placement = self.placements[name]
            for _, module_name, delta in placement:
                if not delta.mergeable:
                    raise RuntimeError(
                        f"adapter {name!r}: {type(delta).__name__} at {module_name or 'model level'!r} cannot be merged"
                    )
            log, errors = [], {}
            with torch.no_grad():
                for _, module_name, delta in sorted(placement, key=lambda t: _SITE_ORDER[t[2].site]):
                    base = self.model.get_submodule(module_name)
                    dparams = delta.delta_params(base)
                    for pname, dp in dparams.items():
                        err = add_to_param(base, pname, dp)  # a 4-bit weight is requantized: err
                        if err is not None:
                            errors[module_name] = max(err, errors.get(module_name, 0.0))
                    log.append((base, delta, dparams if delta.merge_uses_base else None))
            self._merge_log[name] = log
            self._state.merged.append(name)
            if errors:
                self._merge_errors[name] = errors
                _log.info("merge %r into 4-bit layers: max requantization error %.3g", name, max(errors.values()))
        self._state.touch()
        return {m: e for n in names for m, e in self._merge_errors.get(n, {}).items()}

    @property
    def merge_report(self) -> dict[str, dict[str, float]]:
        """{merged adapter: {4-bit module: max |deq(q(W + ΔW)) − (W + ΔW)|}}: merging into a
        quantized base requantizes its weights, and this is how far the merged layer is from the
        float merge. Empty when nothing merged into a 4-bit layer (a float merge is exact)."""
        return {n: dict(e) for n, e in self._merge_errors.items() if n in self._state.merged}

    def unmerge(self) -> dict[str, float]:
        """Undo ``merge``: W <- W - ΔW, newest adapter first (base restored up to float rounding).

        A 4-bit layer is requantized again, so it is restored within the two requantization errors
        (merge's, in :attr:`merge_report`, plus unmerge's), not bit for bit: returns {module:
        unmerge's requantization error} for those, empty for a float base."""
        errors: dict[str, float] = {}
        names = {id(m): n for n, m in self.model.named_modules()} if self._merge_errors else {}
        if self._state.merged:
            self._follow_base(everywhere=True)
        with torch.no_grad():
            for name in reversed(self._state.merged):
                for base, delta, kept in reversed(self._merge_log.pop(name)):
                    dparams = kept if kept is not None else delta.delta_params(base)
                    for pname, dp in dparams.items():
                        err = add_to_param(base, pname, -dp)
                        if err is not None:
                            key = names.get(id(base), "")
                            errors[key] = max(err, errors.get(key, 0.0))
                self._merge_errors.pop(name, None)
        self._state.merged = []
        self._state.touch()
        return errors

    def unload(self) -> nn.Module:
        """Remove every hook (unmerging first) and give back the base model as it was."""
        if self._state.merged:
            self.unmerge()
        for disp in self._dispatchers.values():
            disp.close()
        self._dispatchers.clear()
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(n, p.requires_grad))
        model = self.model
        for name in list(self.configs):
            del self.adapter_modules[name]
        self.configs.clear()
        self.placements.clear()
        self._trainable.clear()
        self._training.clear()
        self._steps.clear()
        self._state.active = []
        self._state.composition = None
        self._state.touch()
        return model

    def merge_and_unload(self, adapter_names: Sequence[str] | None = None) -> nn.Module:
        """Merge the adapters for good and return the plain base model (no hooks, no extra cost)."""
        self.merge(adapter_names)
        self._state.merged = []
        self._merge_log.clear()
        return self.unload()

    # -- files and accounting ---------------------------------------------------------------------
    def adapter_tensors(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """An adapter's tensors under their file keys (what ``save`` writes); by default the active
        adapter, or the only one."""
        adapter_name = self._one_adapter(adapter_name, "adapter_tensors")
        return io.placement_tensors(self.placements[adapter_name], self.configs[adapter_name])

    def save(self, path: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Write one adapter's files (``adapter_config.json``, ``peftlab_config.json``,
        ``adapter_model.safetensors``; PEFT's format where PEFT has the method, see ``core/io.py``).

        Without ``adapter_name``: the active adapter, or the only one (else a ``ValueError`` naming
        them; :meth:`save_pretrained` writes every adapter)."""
        name = self._one_adapter(adapter_name, "save")
        io.save_adapter(path, self.configs[name], self.adapter_tensors(name), self.placed(name), base=self.model)

    def _one_adapter(self, adapter_name: str | None, call: str) -> str:
        """``adapter_name``, else the one active adapter, else the only adapter."""
        if adapter_name is not None:
            self._require([adapter_name])
            return adapter_name
        if len(self._state.active) == 1:
            return self._state.active[0]
        if not self._state.active and len(self.configs) == 1:
            return self.adapters[0]
        if not self.configs:
            raise ValueError(f"{call}: the model has no adapter")
        which = f"adapters {self._state.active} are active" if self._state.active else f"no adapter of {self.adapters} is active"
        raise ValueError(
            f"{call}: which adapter? {which}; name one (adapter_name=...)"
            + (", or write every adapter with pm.save_pretrained(directory)" if call == "save" else "")
        )

    # -- Hugging Face PEFT's calls, with PEFT's meaning -------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: Sequence[str] | None = None,
        safe_serialization: bool = True,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """Write the adapter files only (never the base weights), laid out as PEFT does: every
        adapter (or ``selected_adapters``); ``"default"`` if it is among them, else the first, at the
        root of ``save_directory``, every other one in a sub-directory named after it. (PEFT puts an
        adapter not called ``"default"`` in a sub-directory even when it is the only one; here the
        root always holds one, so ``PeftModel.from_pretrained(model, save_directory)`` reads it.)

        Read it back with ``PeftModel.from_pretrained(model, save_directory)`` and
        ``pm.load_adapter(save_directory, name, subfolder=name)`` (or the sub-directory's path),
        here or in PEFT. ``is_main_process=False`` writes nothing (PEFT's rule for multi-process
        runs). Files are always safetensors; PEFT's and transformers' other keyword arguments
        (``safe_serialization``, ``state_dict``, ``max_shard_size``...) are accepted and ignored;
        ``push_to_hub=True`` raises (peftlab does not upload)."""
        if isinstance(selected_adapters, bool):  # PEFT's second positional argument is safe_serialization
            selected_adapters = None
        if kwargs.pop("push_to_hub", False):
            raise NotForwardedError(f"save_pretrained(push_to_hub=True): {NOT_FORWARDED['push_to_hub']}")
        if kwargs.get("path_initial_model_for_weight_conversion") is not None:
            raise NotImplementedError(
                "save_pretrained(path_initial_model_for_weight_conversion=...): converting a PiSSA / OLoRA adapter "
                "to plain LoRA is not implemented; peftlab's files keep the base weights unchanged, so they need no conversion"
            )
        kwargs.pop("path_initial_model_for_weight_conversion", None)
        _check_kwargs("save_pretrained", kwargs, _IGNORED_SAVE_KWARGS)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained: {os.fspath(save_directory)!r} is a file, not a directory")
        names = self.adapters if selected_adapters is None else (
            [selected_adapters] if isinstance(selected_adapters, str) else list(selected_adapters))
        self._require(names)
        if not names:
            raise ValueError("save_pretrained: there is no adapter to save")
        if not is_main_process:
            return
        root = "default" if "default" in names else names[0]
        for name in names:
            self.save(save_directory if name == root else os.path.join(save_directory, name), name)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: Any = None,
        **kwargs: Any,
    ) -> "PeftModel":
        """PEFT's ``PeftModel.from_pretrained``: load the adapter directory ``model_id`` (ours or PEFT's;
        ``subfolder=`` joins a sub-directory, as in PEFT) onto ``model`` under ``adapter_name``.

        As in PEFT, the default ``is_trainable=False`` loads for inference: the adapter's parameters
        are frozen and the model is put in eval mode. Pass ``is_trainable=True`` to train on, or
        call ``pm.set_adapter(name)`` and ``pm.train()`` later. ``config`` (a peftlab config or a PEFT
        config object) replaces the file's config. (``peftlab.load`` is peftlab's own call: it leaves
        the adapter trainable.) Only local directories are read: nothing is downloaded."""
        path = _adapter_dir(model_id, kwargs.pop("subfolder", None))
        _check_kwargs("from_pretrained", kwargs, _IGNORED_LOAD_KWARGS)
        pm = load(model, path, adapter_name, config=config)
        pm._loaded_for(adapter_name, is_trainable)
        return pm

    def load_adapter(
        self,
        model_id: str | os.PathLike,
        adapter_name: str,
        is_trainable: bool = False,
        config: Any = None,
        **kwargs: Any,
    ) -> None:
        """PEFT's ``load_adapter``: add the adapter directory ``model_id`` (``subfolder=`` joins a
        sub-directory) as ``adapter_name``. It is not activated (``set_adapter`` does that) unless no
        adapter is active; with the default ``is_trainable=False`` its parameters are frozen and the
        model is put in eval mode, as in PEFT."""
        path = _adapter_dir(model_id, kwargs.pop("subfolder", None))
        _check_kwargs("load_adapter", kwargs, _IGNORED_LOAD_KWARGS)
        load(self, path, adapter_name, config=config)
        self._loaded_for(adapter_name, is_trainable)

    def _loaded_for(self, adapter_name: str, is_trainable: bool) -> None:
        """PEFT's ``is_trainable``: True makes the adapter's trainable parameters require grad (even
        if it is not active); False freezes them and puts the whole model in eval mode."""
        for p, trainable in self.adapter_parameters(adapter_name):
            p.requires_grad_(trainable and is_trainable)
        if not is_trainable:
            self.eval()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter entries of the container, as PEFT counts them: every
        parameter of the base and of every adapter (a ``modules_to_save`` copy too), trainable when
        it requires grad now. (``report()`` is the accounting of one adapter.)"""
        trainable = total = 0
        for _, p in self.named_parameters():
            n = p.numel()
            if type(p).__name__ == "Params4bit":  # two 4-bit values per stored byte, as PEFT counts them
                n *= 2 * getattr(getattr(p, "quant_storage", None), "itemsize", 1)
            total += n
            if p.requires_grad:
                trainable += n
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: ``trainable params: X || all params: Y || trainable%: Z``."""
        trainable, total = self.get_nb_trainable_parameters()
        percent = 100 * trainable / total if total else 0.0
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}")

    def get_base_model(self) -> nn.Module:
        """The user's own model object (``pm.model``), with the adapters' hooks still in place."""
        return self.model

    def merge_adapter(self, adapter_names: Sequence[str] | None = None) -> None:
        """PEFT's name for :meth:`merge`."""
        self.merge(adapter_names)

    def unmerge_adapter(self) -> None:
        """PEFT's name for :meth:`unmerge`."""
        self.unmerge()

    def placed(self, adapter_name: str) -> dict[str, nn.Module] | None:
        """{module name: delta} of a single-config adapter (None for a union or a hybrid)."""
        if is_union(self.configs[adapter_name]):
            return None
        return {m: d for _, m, d in self.placements[adapter_name]}

    def report(self, adapter_name: str | None = None) -> dict[str, Any]:
        """Honest accounting (DESIGN.md principle 4) for one adapter (default: the first active one)."""
        name = adapter_name or (self._state.active[0] if self._state.active else (self.adapters or [None])[0])
        if name is None:
            raise ValueError("the model has no adapter")
        self._require([name])
        return adapter_report(
            self.model, self.configs[name], self.placements[name],
            trainable=[p for p, flag in self.adapter_parameters(name) if flag],
            adapter_params=list(self.adapter_modules[name].parameters()),
            placed=self.placed(name), adapter_name=name,
        )

    def extra_repr(self) -> str:
        return f"adapters={self.adapters}, active={self.active_adapters}, merged={self._state.merged}"


def apply(
    model: nn.Module,
    config: "AdapterConfig | UnionConfig | str | dict",
    adapter_name: str = "default",
    **overrides: Any,
) -> PeftModel:
    """Attach a new adapter to ``model`` and activate it.

    ``config`` is a config object, a dict, a method string such as
    ``"lora[r=8,alpha=16,targets=q_proj|v_proj]"``, or a Hugging Face PEFT config object
    (``peft.LoraConfig(...)``, read through the registered PEFT readers; ``core/config.from_peft_config``). ``overrides`` set config fields (on the first
    part of a union), e.g. ``modules_to_save=["classifier"]``. The base parameters are frozen.
    A plain model that another ``PeftModel`` already hooks is refused with a ``ValueError`` that
    points to ``pm.add_adapter`` (a second set of hooks would change the first container's outputs).
    """
    cfg = as_config(config)
    if overrides:
        if isinstance(cfg, UnionConfig):
            cfg = UnionConfig([cfg.parts[0].replace(**overrides), *cfg.parts[1:]])
        else:
            cfg = cfg.replace(**overrides)
    if isinstance(cfg, BaseChangingConfig):  # e.g. qlora: quantizes the base, then places LoRA
        return cfg.apply_to(model, adapter_name)
    placement = build_placement(model.model if isinstance(model, PeftModel) else model, cfg)
    pm = model if isinstance(model, PeftModel) else PeftModel(model)
    pm._check_new_name(adapter_name)
    pm._install(adapter_name, cfg, placement)
    pm.set_adapter(adapter_name)
    return pm


def load(
    model: nn.Module, path: str | os.PathLike, adapter_name: str = "default", *, config: Any = None
) -> PeftModel:
    """Load an adapter directory (written by peftlab or by Hugging Face PEFT) onto ``model``.

    Everything is validated before the model is touched: a missing directory, a corrupt file or an
    adapter made for another base raises :class:`~peftlab.core.io.AdapterFileError`. On a plain
    model the adapter becomes active; on a ``PeftModel`` it is added (and activated if none is).
    The adapter is trainable (``PeftModel.from_pretrained`` has PEFT's default: frozen).
    ``config`` (a peftlab config, a method string or a PEFT config object) replaces the file's.
    """
    existing = model if isinstance(model, PeftModel) else None
    base = existing.model if existing is not None else model
    if existing is not None:
        existing._check_new_name(adapter_name)
    cfg, tensors = io.read_adapter(path)
    if config is not None:
        cfg = as_config(config)
    placement = build_placement(base, cfg)
    io.load_into_placement(placement, tensors, cfg, where=str(path))
    pm = existing if existing is not None else PeftModel(base)
    pm._install(adapter_name, cfg, placement)
    if existing is None or not pm.active_adapters:
        pm.set_adapter(adapter_name)
    return pm
