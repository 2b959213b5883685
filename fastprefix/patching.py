"""`patch` / `patched`: make a HuggingFace model attend to a `Prefix` without putting it in any cache.

Where the hook sits, and why: transformers 5 attention modules compute q, k, v (rotated, cache updated)
and then call the function that `config._attn_implementation` names in `AttentionInterface`. That call is
the narrowest point that sees q, k, v and the mask of every layer, so fastprefix registers one function
there, "fastprefix", with `sdpa_mask` as its mask builder (`AttentionMaskInterface`), and points the
model's configs at it (every config of the model: T5's encoder and decoder stacks hold their own copies).
Nothing of the model's forward code is copied, so a transformers release that changes how caches or
positions are handled upstream of attention is followed, not fought. The family module adds the hooks it
needs (`models/llama.py`: a pre-hook on the rotary embedding to offset positions by P; `models/t5.py`: a
pre-hook recording how many tokens the decoder's cache already holds).

A model may have several attention kinds (T5: "encoder", "decoder", "cross"), each with its own prefix;
`patch(model, prefix)` with a bare `Prefix` gives it to the family's first kind ("decoder": every layer of a
decoder-only model, T5's decoder self-attention as PEFT places it), `patch(model, {kind: Prefix, ...})`
to the kinds named. Kinds without a prefix attend to their sequence alone.

Unpatching restores the config values and removes the hooks, and leaves no attribute on the model. The
registration of the "fastprefix" function in transformers' global interfaces stays (transformers has no
public way to remove one); it is only reached by a model whose config names it.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping

from torch import nn

from .dispatch import check_backend
from .models import ATTN_IMPLEMENTATION, family_of, signature
from .models.base import Family, Geometry, LayerPrefix, Site

# Attention module -> (weak reference to its handle, attention kind, layer index) for every patched model;
# read by the registered function. Only the model keeps its handle alive (through the family's hooks), so a
# patched model that is dropped without unpatching is freed like any other.
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


def prefixes_by_kind(prefix, family: Family, model: nn.Module) -> dict[str, LayerPrefix]:
    """{kind: Prefix} for `prefix` (a `Prefix`, which goes to the family's first kind, or a dict naming
    kinds), each checked against the model."""
    geometry = family.geometry(model)
    kinds = ", ".join(f"{kind!r} ({family.kinds[kind]})" for kind in geometry)
    default = next(iter(family.kinds))
    if isinstance(prefix, LayerPrefix):
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
            f"fastprefix: expected a fastprefix.Prefix, or a dict {{kind: Prefix}} with kinds among {kinds}; got "
            f"{type(prefix).__name__}."
        )
    for kind, p in prefixes.items():
        check_prefix(p, geometry[kind], model, family.kinds[kind])
    return prefixes


def _configs(model: nn.Module) -> list:
    """Every distinct config of the model's transformers submodules (T5's stacks hold copies of their own)."""
    from transformers import PreTrainedModel

    configs = {}
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            configs.setdefault(id(module.config), module.config)
    return list(configs.values())


class PatchHandle:
    """A model patched by `patch`. `unpatch()` restores it; `set_prefix` swaps the prefix in place.

    `prefix` is what was given (a `Prefix` or a dict), `prefixes` the same as {kind: Prefix}, `backend` the
    backend every attention call runs on. The handle is the state its family's code sees
    (`models.base.PatchState`): `modules`, `backend`, and `scratch`, which holds what the family's hooks record
    during a forward for its attention function (T5: the decoder's cache length) and is emptied by `unpatch`.
    """

    def __init__(self, model, family: Family, prefix, prefixes: dict[str, LayerPrefix], backend: str):
        self.model, self.family, self.backend = model, family, backend
        self._prefix, self.prefixes = prefix, prefixes
        self.modules = family.attention_modules(model)
        self.scratch: dict = {}
        self._saved_implementations = [(config, config._attn_implementation) for config in _configs(model)]
        self._hooks = family.install(model, self)
        for kind, modules in self.modules.items():
            for i, module in enumerate(modules):
                _PATCHED_MODULES[module] = (weakref.ref(self), kind, i)
        for config, _ in self._saved_implementations:
            config._attn_implementation = ATTN_IMPLEMENTATION
        self.active = True

    @property
    def prefix(self):
        return self._prefix

    def prefix_length(self, kind: str) -> int:
        prefix = self.prefixes.get(kind)
        return 0 if prefix is None else prefix.length

    def set_prefix(self, prefix) -> None:
        """Attend to `prefix` from now on (checked like the prefix given to `patch`); kinds it does not name
        attend to their sequence alone."""
        self._require_active("set_prefix")
        self.prefixes = prefixes_by_kind(prefix, self.family, self.model)
        self._prefix = prefix

    def unpatch(self) -> None:
        """Restore the model exactly as it was before `patch`."""
        self._require_active("unpatch")
        for config, implementation in reversed(self._saved_implementations):
            config._attn_implementation = implementation
        for hook in self._hooks:
            hook.remove()
        for modules in self.modules.values():
            for module in modules:
                del _PATCHED_MODULES[module]
        self.scratch.clear()
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
            "part of a patched model (a copy of a patched model?). Patch this model with fastprefix.patch, or "
            "set its config._attn_implementation back to 'sdpa'."
        )
    prefix = handle.prefixes.get(kind)
    if prefix is None:
        prefix_k = prefix_v = key.new_empty(key.shape[1], 0, key.shape[3])
    else:
        prefix_k, prefix_v = prefix.layer(layer)
    return handle.family.attention(module, query, key, value, attention_mask, prefix_k, prefix_v,
                                   site=Site(state=handle, kind=kind, layer=layer), **kwargs)


def patch_family(model, prefix, family: Family, backend: str = "auto") -> PatchHandle:
    """`patch` with an explicit family (`from_peft` uses a PEFT-compatible variant of a registered one)."""
    check_backend(backend, model.device, "fastprefix.patch")
    modules = family.attention_modules(model)
    if any(module in _PATCHED_MODULES for of_kind in modules.values() for module in of_kind):
        raise RuntimeError(
            f"fastprefix: {type(model).__name__} is already patched; call unpatch() on its handle first "
            "(or handle.set_prefix(prefix) to change the prefix)."
        )
    prefixes = prefixes_by_kind(prefix, family, model)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _fastprefix_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return PatchHandle(model, family, prefix, prefixes, backend)


def patch(model, prefix, *, backend: str = "auto") -> PatchHandle:
    """Route every attention layer of `model` through `prefix_attention` with `prefix` before the sequence.

    `prefix`: a `Prefix` for the family's first attention kind (every layer of a decoder-only model; T5's
    decoder self-attention), or a dict {kind: Prefix} (T5: "encoder", "decoder", "cross"). The prefix never
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
