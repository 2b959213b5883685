"""`patch` / `patched`: make a HuggingFace model attend to a `Prefix` without putting it in any cache.

Where the hook sits, and why: transformers 5 attention modules compute q, k, v (rotated, cache updated)
and then call the function that `config._attn_implementation` names in `AttentionInterface`. That call is
the narrowest point that sees q, k, v and the mask of every layer, so fastprefix registers one function
there, "fastprefix", with `sdpa_mask` as its mask builder (`AttentionMaskInterface`), and points the
model's modules at it. transformers shares one config object between models built from it, so the config
itself is left alone: each module of the patched model that holds a config gets a view of it
(`config_view`) that reads and writes the same attributes but names "fastprefix". Nothing of the model's
forward code is copied, so a transformers release that changes how caches or positions are handled upstream
of attention is followed, not fought. The family module changes the class of the modules it needs to
(`models/llama.py`: the rotary embedding offsets positions by P; `models/t5.py`: self-attention passes how
many tokens the cache already holds).

What lives where: the patch (the handle) holds the prefix and backend; what one call needs is passed with
the call, or kept per thread (`PatchHandle.scratch`), so one patched model serves several threads at once.
`copy.deepcopy` and `pickle` / `torch.save` of a patched model give the model unpatched (the views and
classes copy as the model's own); patch the copy, or save the prefix with `Prefix.save`.

A model may have several attention kinds (T5: "encoder", "decoder", "cross"), each with its own prefix;
`patch(model, prefix)` with a bare `Prefix` gives it to the family's first kind ("decoder": every layer of a
decoder-only model, T5's decoder self-attention as PEFT places it), `patch(model, {kind: Prefix, ...})`
to the kinds named. Kinds without a prefix attend to their sequence alone.

Unpatching gives every module back its config and class, and leaves no attribute on the model. The
registration of the "fastprefix" function in transformers' global interfaces stays (transformers has no
public way to remove one); it is only reached by a model whose config names it.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import threading
import warnings
import weakref
from collections.abc import Mapping

import torch
from torch import nn

from .dispatch import check_backend, check_bank_backend, check_levels_backend
from .levels import Levels
from .models import ATTN_IMPLEMENTATION, FAMILIES, family_of, signature
from .models.base import BankRowsPrefix, Family, Geometry, LayerPrefix, Site

# Attention module -> (weak reference to its handle, attention kind, layer index) for every patched model;
# read by the registered function. Only the model keeps its handle alive (through the config views its modules
# hold), so a patched model that is dropped without unpatching is freed like any other.
_PATCHED_MODULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_prefix(prefix, geometry: Geometry, model: nn.Module, where: str) -> None:
    """Raise unless `prefix` fits the attention kind described by `where`, of `geometry` (layers, KV heads,
    head dim), and the model's dtype and device."""
    if not isinstance(prefix, LayerPrefix):
        raise TypeError(f"fastprefix: expected a fastprefix.Prefix for {where}, got {type(prefix).__name__}.")
    name = type(model).__name__
    for what, got, want in (("layers", prefix.num_layers, geometry.num_layers),
                            ("KV heads (Hkv)", prefix.num_kv_heads, geometry.num_kv_heads),
                            ("head dim (D)", prefix.head_dim, geometry.head_dim)):
        if got != want:
            raise ValueError(
                f"fastprefix: the prefix for {where} has {got} {what} but {name} has {want}; build the Prefix "
                f"with one [Hkv={geometry.num_kv_heads}, P, D={geometry.head_dim}] tensor per layer "
                f"({geometry.num_layers} layers)."
            )
    source = getattr(prefix, "source", None)
    if source is not None and source != signature(model):
        raise ValueError(
            f"fastprefix: the prefix for {where} was computed by a model of signature {source}, but {name} has "
            f"{signature(model)} (another model type or config); compute it with this model "
            "(Prefix.from_prompt(model, input_ids)), or build Prefix(keys, values) without a source."
        )
    if prefix.dtype != model.dtype or prefix.device != model.device:
        raise ValueError(
            f"fastprefix: the prefix for {where} is {prefix.dtype} on {prefix.device} but {name} is {model.dtype} on "
            f"{model.device}; move it with tensor.to({model.device.type!r}, {model.dtype})."
        )


def prefixes_by_kind(prefix, family: Family, model: nn.Module) -> dict[str, LayerPrefix | Levels]:
    """{kind: Prefix or Levels} for `prefix` (a `Prefix` or a list of levels, which go to the family's first kind,
    or a dict naming kinds), each checked against the model. A list of one level is that level."""
    geometry = family.geometry(model)
    kinds = ", ".join(f"{kind!r} ({family.kinds[kind]})" for kind in geometry)
    default = next(iter(family.kinds))
    if isinstance(prefix, (LayerPrefix, list, tuple)):
        if default not in geometry:
            raise ValueError(
                f"fastprefix: a bare Prefix goes to {family.kinds[default]}, which {type(model).__name__} does not "
                f"have; give a dict {{kind: Prefix}} with kinds among {kinds}."
            )
        prefixes = {default: prefix}
    elif isinstance(prefix, Mapping):
        prefixes = dict(prefix)
        unknown = [kind for kind in prefixes if kind not in geometry]
        if unknown or not prefixes:
            got = f"unknown kinds {unknown}" if unknown else "an empty dict"
            raise ValueError(
                f"fastprefix: the prefix dict for {type(model).__name__} must map attention kinds among {kinds} to "
                f"Prefix objects; got {got}."
            )
    else:
        raise TypeError(
            f"fastprefix: expected a fastprefix.Prefix, a list of levels [level0, level1, ...], or a dict "
            f"{{kind: Prefix}} with kinds among {kinds}; got {type(prefix).__name__}."
        )
    for kind, p in prefixes.items():
        if isinstance(p, (list, tuple)):
            prefixes[kind] = p = _levels(p, family, geometry[kind], model, family.kinds[kind])
            if isinstance(p, Levels):
                continue
        check_prefix(p, geometry[kind], model, family.kinds[kind])
        start = getattr(p, "start", 0)
        if start:
            raise ValueError(
                f"fastprefix: the prefix for {family.kinds[kind]} was computed after levels of {start} positions "
                "(Prefix.from_prompt(..., after=...)); patch with the list of levels [level0, ..., this prefix]."
            )
        if isinstance(p, BankRowsPrefix) and not family.reads_banks:
            raise TypeError(
                f"fastprefix: bank rows (PrefixBank.rows) are read by the "
                f"{' and '.join(f.name for f in FAMILIES if f.reads_banks)} "
                f"family only for now, not by {family.name} ({type(model).__name__}); give each row's prefix as a "
                "per-row Prefix ([B, Hkv, P, D] tensors) or run the rows of each entry as a batch of their own."
            )
    return prefixes


def _levels(levels, family: Family, geometry: Geometry, model: nn.Module, where: str) -> LayerPrefix | Levels:
    """`Levels` of a list of levels for the attention kind `where`, each level checked against the model; the
    level itself when there is one."""
    if any(isinstance(level, torch.Tensor) for level in levels):
        raise TypeError(
            f"fastprefix: expected a fastprefix.Prefix for {where}, got list of tensors; build Prefix(keys, values) "
            "from one key and one value tensor per layer (a list is read as levels of Prefixes)."
        )
    if not family.reads_levels:
        raise TypeError(
            f"fastprefix: levels of prefixes (a list [level0, level1, ...]) are read by the "
            f"{' and '.join(f.name for f in FAMILIES if f.reads_levels)} family only, not by {family.name} "
            f"({type(model).__name__}); give one Prefix per attention kind."
        )
    found = Levels(levels, f"the levels for {where}")
    for i, level in enumerate(found.levels):
        check_prefix(level, geometry, model, f"level {i} of {where}")
    return found.levels[0] if len(found.levels) == 1 else found


def check_bank_rows_backend(prefixes: dict[str, LayerPrefix], backend: str, where: str) -> None:
    """Refuse bank rows among `prefixes` on a backend that does not read a bank ('reference': it takes one
    prefix), and levels on one that does not read levels (only the torch path does)."""
    if any(isinstance(p, Levels) for p in prefixes.values()):
        check_levels_backend(backend, f"{where} with levels", environment=False)
    if any(isinstance(p, BankRowsPrefix) for p in prefixes.values()):
        check_bank_backend(backend, f"{where} with bank rows", environment=False)


def config_view(config, handle: PatchHandle):
    """A view of `config` for the modules of a patched model: an instance of a subclass of the config's class
    that shares the config's attributes (reads and writes go to the config itself) but names fastprefix's
    attention function. It keeps `handle` alive as long as a module holds it. Copies and pickles of the view
    are of the config (unpatched)."""
    base = type(config)

    def implementation(view):
        return ATTN_IMPLEMENTATION if view.__dict__ is config.__dict__ else base._attn_implementation.fget(view)

    def set_implementation(view, value):
        if view.__dict__ is config.__dict__:
            raise RuntimeError(
                f"fastprefix: this model is patched, so its attention implementation is {ATTN_IMPLEMENTATION!r}; "
                f"call fastprefix.unpatch(model) before setting it to {value!r}.")
        base._attn_implementation.fset(view, value)

    view_class = type(base.__name__, (base,), {
        "__module__": base.__module__, "__qualname__": base.__qualname__, "_fastprefix_handle": handle,
        "_attn_implementation": property(implementation, set_implementation),
        "__reduce_ex__": lambda view, protocol: (operator.itemgetter(0), ((config,),)),
        "__copy__": lambda view: config,
        "__deepcopy__": lambda view, memo: copy.deepcopy(config, memo)})
    view = object.__new__(view_class)
    object.__setattr__(view, "__dict__", config.__dict__)
    return view


class PatchHandle:
    """A model patched by `patch`. `unpatch()` restores it; `set_prefix` swaps the prefix in place.

    `prefix` is what was given (a `Prefix` or a dict), `prefixes` the same as {kind: Prefix}, `backend` the
    backend every attention call runs on. The handle is the state its family's code sees
    (`models.base.PatchState`): `modules`, `prefixes`, `backend`, and `scratch`, where an attention call leaves
    what a later one of the same forward needs, one dict per thread, emptied by `unpatch`.
    """

    def __init__(self, model, family: Family, prefix, prefixes: dict[str, LayerPrefix], backend: str):
        from transformers import PretrainedConfig

        self.model, self.family, self.backend = model, family, backend
        self._prefix, self.prefixes = prefix, prefixes
        self.modules = family.attention_modules(model)
        self._threads = threading.local()
        self._changes = family.install(model, self)
        views, self._configs = {}, []
        for module in model.modules():
            config = module.__dict__.get("config")
            if isinstance(config, PretrainedConfig):
                if id(config) not in views:
                    views[id(config)] = config_view(config, self)
                module.__dict__["config"] = views[id(config)]
                self._configs.append((module, config))
        for kind, modules in self.modules.items():
            for i, module in enumerate(modules):
                _PATCHED_MODULES[module] = (weakref.ref(self), kind, i)
        self.active = True

    @property
    def prefix(self):
        return self._prefix

    @property
    def scratch(self) -> dict:
        """This thread's scratch dict (see the class docstring)."""
        if not hasattr(self._threads, "scratch"):
            self._threads.scratch = {}
        return self._threads.scratch

    def position_shift(self, kind: str, rows: int):
        """P of the prefix of attention kind `kind` (0 without one); for bank rows, a [rows, 1] tensor of each
        row's entry's P; for levels, their total length (per row when the last level is bank rows)."""
        prefix = self.prefixes.get(kind)
        if prefix is None:
            return 0
        if isinstance(prefix, Levels):
            return prefix.position_shift(rows)
        return prefix.lengths_for(rows)[:, None] if isinstance(prefix, BankRowsPrefix) else prefix.length

    def set_prefix(self, prefix) -> None:
        """Attend to `prefix` from now on (checked like the prefix given to `patch`); kinds it does not name
        attend to their sequence alone."""
        self._require_active("set_prefix")
        prefixes = prefixes_by_kind(prefix, self.family, self.model)
        check_bank_rows_backend(prefixes, self.backend, "set_prefix")
        self.prefixes, self._prefix = prefixes, prefix

    def unpatch(self) -> None:
        """Restore the model exactly as it was before `patch`."""
        self._require_active("unpatch")
        for module, config in self._configs:
            module.__dict__["config"] = config
        for change in self._changes:
            change.remove()
        for modules in self.modules.values():
            for module in modules:
                del _PATCHED_MODULES[module]
        self._threads = threading.local()
        self.active = False

    def _require_active(self, what: str) -> None:
        if not self.active:
            raise RuntimeError(f"fastprefix: {what}() on a handle that was already unpatched; patch the model again.")


def _fastprefix_attention(module, query, key, value, attention_mask, **kwargs):
    """The function registered as "fastprefix" in transformers' AttentionInterface."""
    ref, kind, layer = _PATCHED_MODULES.get(module, (lambda: None, None, None))
    handle = ref()
    if handle is None:
        raise RuntimeError(
            f"fastprefix: {type(module).__name__} runs with attn_implementation={ATTN_IMPLEMENTATION!r} but is not "
            "part of a patched model (was it built from the config of a patched model?). Patch this model with "
            "fastprefix.patch, or build it from a config of a model that is not patched."
        )
    if kwargs.get("output_attentions"):
        warnings.warn("fastprefix computes no attention maps, so output_attentions=True returns none (as with "
                      "attn_implementation='sdpa'). For the maps, unpatch the model (fastprefix.unpatch(model)) "
                      "and run it with attn_implementation='eager' on [prefix ; sequence].", stacklevel=2)
    prefix = handle.prefixes.get(kind)
    if prefix is None:
        prefix_k = prefix_v = key.new_empty(key.shape[1], 0, key.shape[3])
    elif isinstance(prefix, Levels):
        kwargs["prefix_levels"] = prefix.op_levels(layer, query.shape[0])
        prefix_k = prefix_v = None
    elif isinstance(prefix, BankRowsPrefix):
        kwargs["prefix_index"] = prefix.index_for(query.shape[0])
        prefix_k, prefix_v = prefix.layer(layer)
    else:
        _check_rows(prefix, query.shape[0])
        prefix_k, prefix_v = prefix.layer(layer)
    return handle.family.attention(module, query, key, value, attention_mask, prefix_k, prefix_v,
                                   site=Site(state=handle, kind=kind, layer=layer), **kwargs)


def _check_rows(prefix: LayerPrefix, batch: int) -> None:
    rows = getattr(prefix, "batch_size", None)
    if rows is None or rows == batch:
        return
    repeats = (f" `generate` repeats each row num_beams x num_return_sequences times ({batch // rows} here), and "
               "a per-row prefix is not repeated with it: generate with num_beams=1 and num_return_sequences=1, or "
               f"give one prefix row per generated sequence (each tensor's rows repeated {batch // rows} times)."
               if batch % rows == 0 else "")
    raise ValueError(f"fastprefix: the prefix has one row per sequence (B={rows}) but the batch has {batch} rows."
                     + (repeats or " Give a prefix with one row per batch row, or a shared [Hkv, P, D] prefix."))


def patch_family(model, prefix, family: Family, backend: str = "auto") -> PatchHandle:
    """`patch` with an explicit family (`from_peft` uses a PEFT-compatible variant of a registered one)."""
    check_backend(backend, model.device, "fastprefix.patch")
    modules = family.attention_modules(model)
    if any(module in _PATCHED_MODULES for of_kind in modules.values() for module in of_kind):
        raise RuntimeError(
            f"fastprefix: {type(model).__name__} is already patched; call fastprefix.unpatch(model) (or unpatch() "
            "on its handle) first, or handle.set_prefix(prefix) to change the prefix."
        )
    prefixes = prefixes_by_kind(prefix, family, model)
    check_bank_rows_backend(prefixes, backend, "fastprefix.patch")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _fastprefix_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return PatchHandle(model, family, prefix, prefixes, backend)


def patch(model, prefix, *, backend: str = "auto") -> PatchHandle:
    """Route every attention layer of `model` through `prefix_attention` with `prefix` before the sequence.

    `prefix`: a `Prefix` for the family's first attention kind (every layer of a decoder-only model; T5's
    decoder self-attention), a list of levels [level0, level1, ...] attended in that order (cascade prompts:
    shared Prefixes, each computed `after=` the ones before it, and bank rows as the last level; LLaMA family,
    backend "torch" or "auto"), or a dict {kind: Prefix} (T5: "encoder", "decoder", "cross"). The prefix never
    enters a cache (after `generate` the cache holds the sequence only), sequence tokens sit at positions
    P, P + 1, ... (rotary models; T5's relative bias gives prefix columns the positions just before the
    sequence), and the model's own attention mask (padding, left padding) applies to sequence keys. Every
    attention call runs `prefix_attention(..., backend=backend)` ("auto", "triton", "torch" or "reference";
    FASTPREFIX_BACKEND replaces "auto"); a backend that cannot run on the model's device is refused here.
    Returns a handle; `handle.unpatch()` restores the model exactly.
    """
    return patch_family(model, prefix, family_of(model), backend)


@contextlib.contextmanager
def patched(model, prefix, *, backend: str = "auto"):
    """`patch` for the duration of a `with` block; yields the handle."""
    handle = patch(model, prefix, backend=backend)
    try:
        yield handle
    finally:
        handle.unpatch()


def handle_of(model) -> PatchHandle | None:
    """The handle of the patch serving `model` (or a module of it), or None if no module of it is patched."""
    for module in model.modules():
        if module in _PATCHED_MODULES:
            return _PATCHED_MODULES[module][0]()
    return None


def unpatch(model) -> None:
    """Restore `model`, patched by `patch`, `patched` or `from_peft`, without its handle."""
    if callable(getattr(type(model), "_fastprefix_unpatch", None)):
        model._fastprefix_unpatch()
        return
    handle = handle_of(model)
    if handle is None:
        raise ValueError(f"fastprefix.unpatch: {type(model).__name__} is not patched (no module of it is).")
    handle.unpatch()
