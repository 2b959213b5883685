"""`patch` / `patched`: make a HuggingFace model attend to a `Prefix` without putting it in any cache.

Where the hook sits, and why: transformers 5 attention modules compute q, k, v (rotated, cache updated)
and then call the function that `config._attn_implementation` names in `AttentionInterface`. That call is
the narrowest point that sees q, k, v and the mask of every layer, so fastprefix registers one function
there, "fastprefix", with `sdpa_mask` as its mask builder (`AttentionMaskInterface`), and points the
model's config at it. Nothing of the model's forward code is copied, so a transformers release that
changes how caches or positions are handled upstream of attention is followed, not fought. The family
module (e.g. `models/llama.py`) adds a pre-hook on the rotary embedding to offset positions by P.

Unpatching restores the config value and removes the hook, and leaves no attribute on the model. The
registration of the "fastprefix" function in transformers' global interfaces stays (transformers has no
public way to remove one); it is only reached by a model whose config names it.
"""

from __future__ import annotations

import contextlib
import weakref

from torch import nn

from .models import Family, Geometry
from .models import llama
from .prefix import Prefix

ATTN_IMPLEMENTATION = "fastprefix"

FAMILIES: tuple[Family, ...] = (llama.FAMILY,)
REGISTRY: dict[str, Family] = {model_type: family for family in FAMILIES for model_type in family.model_types}

# Attention module -> (weak reference to its handle, layer index) for every patched model; read by the
# registered function. Only the model keeps its handle alive (through the position hook), so a patched
# model that is dropped without unpatching is freed like any other.
_PATCHED_MODULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def supported_families() -> str:
    return "; ".join(f"{f.name} (model_type {', '.join(f.model_types)})" for f in FAMILIES)


def family_of(model) -> Family:
    """The registered family of a transformers model, or a TypeError listing the supported ones."""
    # transformers is imported on first use, so that `import fastprefix` costs no more than torch.
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        hint = (" For a PEFT model use fastprefix.from_peft(peft_model)."
                if hasattr(model, "get_base_model") else "")
        raise TypeError(
            f"fastprefix: expected a transformers PreTrainedModel, got {type(model).__name__}.{hint} "
            f"Supported families: {supported_families()}."
        )
    model_type = getattr(model.config, "model_type", None)
    if model_type not in REGISTRY:
        raise TypeError(
            f"fastprefix: {type(model).__name__} (model_type {model_type!r}) is not supported. "
            f"Supported families: {supported_families()}."
        )
    return REGISTRY[model_type]


def check_prefix(prefix, geometry: Geometry, model: nn.Module) -> None:
    """Raise unless `prefix` fits a model of `geometry` (layers, KV heads, head dim, dtype, device)."""
    if not isinstance(prefix, Prefix):
        raise TypeError(f"fastprefix: expected a fastprefix.Prefix, got {type(prefix).__name__}.")
    name = type(model).__name__
    for what, got, want in (("layers", prefix.num_layers, geometry.num_layers),
                            ("KV heads (Hkv)", prefix.num_kv_heads, geometry.num_kv_heads),
                            ("head dim (D)", prefix.head_dim, geometry.head_dim)):
        if got != want:
            raise ValueError(
                f"fastprefix: the prefix has {got} {what} but {name} has {want}; build the Prefix with one "
                f"[Hkv={geometry.num_kv_heads}, P, D={geometry.head_dim}] tensor per layer "
                f"({geometry.num_layers} layers)."
            )
    if prefix.dtype != model.dtype or prefix.device != model.device:
        raise ValueError(
            f"fastprefix: the prefix is {prefix.dtype} on {prefix.device} but {name} is {model.dtype} on "
            f"{model.device}; move it with tensor.to({model.device.type!r}, {model.dtype})."
        )


class PatchHandle:
    """A model patched by `patch`. `unpatch()` restores it; `set_prefix` swaps the prefix in place."""

    def __init__(self, model, family: Family, prefix: Prefix):
        self.model, self.family = model, family
        self._prefix = prefix
        self._saved_implementation = model.config._attn_implementation
        self._modules = family.attention_modules(model)
        self._hook = family.offset_positions(model, lambda: self._prefix.length)
        for i, module in enumerate(self._modules):
            _PATCHED_MODULES[module] = (weakref.ref(self), i)
        model.config._attn_implementation = ATTN_IMPLEMENTATION
        self.active = True

    @property
    def prefix(self) -> Prefix:
        return self._prefix

    def set_prefix(self, prefix: Prefix) -> None:
        """Attend to `prefix` from now on (checked like the prefix given to `patch`)."""
        self._require_active("set_prefix")
        check_prefix(prefix, self.family.geometry(self.model), self.model)
        self._prefix = prefix

    def unpatch(self) -> None:
        """Restore the model exactly as it was before `patch`."""
        self._require_active("unpatch")
        self.model.config._attn_implementation = self._saved_implementation
        self._hook.remove()
        for module in self._modules:
            del _PATCHED_MODULES[module]
        self.active = False

    def _require_active(self, what: str) -> None:
        if not self.active:
            raise RuntimeError(f"fastprefix: {what}() on a handle that was already unpatched; patch the model again.")


def _fastprefix_attention(module, query, key, value, attention_mask, **kwargs):
    """The function registered as "fastprefix" in transformers' AttentionInterface."""
    ref, layer = _PATCHED_MODULES.get(module, (lambda: None, None))
    handle = ref()
    if handle is None:
        raise RuntimeError(
            f"fastprefix: {type(module).__name__} runs with attn_implementation={ATTN_IMPLEMENTATION!r} but is not "
            "part of a patched model (a copy of a patched model?). Patch this model with fastprefix.patch, or "
            "set its config._attn_implementation back to 'sdpa'."
        )
    prefix_k, prefix_v = handle.prefix.layer(layer)
    return handle.family.attention(module, query, key, value, attention_mask, prefix_k, prefix_v, **kwargs)


def patch(model, prefix: Prefix) -> PatchHandle:
    """Route every attention layer of `model` through `prefix_attention` with `prefix` before the sequence.

    The prefix never enters a cache (after `generate` the cache holds the sequence only), sequence tokens
    sit at positions P, P + 1, ..., and the model's own attention mask (padding, left padding) applies to
    sequence keys. Returns a handle; `handle.unpatch()` restores the model exactly.
    """
    family = family_of(model)
    if any(module in _PATCHED_MODULES for module in family.attention_modules(model)):
        raise RuntimeError(
            f"fastprefix: {type(model).__name__} is already patched; call unpatch() on its handle first "
            "(or handle.set_prefix(prefix) to change the prefix)."
        )
    check_prefix(prefix, family.geometry(model), model)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _fastprefix_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    return PatchHandle(model, family, prefix)


@contextlib.contextmanager
def patched(model, prefix: Prefix):
    """`patch` for the duration of a `with` block; yields the handle."""
    handle = patch(model, prefix)
    try:
        yield handle
    finally:
        handle.unpatch()
