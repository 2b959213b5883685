"""What a model family is, for `patching`: its attention kinds, where their modules are, the attention function
it registers, the classes it gives modules while patched, and how it runs a prompt; and the per-patch state
its code may use.

A model has one or more attention *kinds*, each of which may attend to its own prefix: a decoder-only model
has one ("decoder", every self-attention layer); T5 has three ("decoder" self-attention, "encoder"
self-attention, "cross" decoder-to-encoder attention). A bare prefix goes to a family's first kind.
"""

from __future__ import annotations

import copyreg
import weakref
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class LayerPrefix(Protocol):
    """What patching reads of a prefix (`fastprefix.Prefix` is one): its sizes, dtype and device, and the
    (keys, values) of layer i."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    length: int
    dtype: torch.dtype
    device: torch.device
    prompt_ids: torch.Tensor | None
    """A prompt's token ids [P] when the keys and values are that prompt's, at positions 0 .. P - 1 (a sliding
    window then hides them as it would hide the prompt); None for a learned prefix, which is always visible."""

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of layer i."""


@runtime_checkable
class BankRowsPrefix(LayerPrefix, Protocol):
    """A prefix whose rows read entries of a bank of shared prefixes (`fastprefix.bank.BankRows` is one): row b
    reads entry index[b], [Hkv, P_t, D] per layer, P differing between entries. `layer(i)` returns
    (keys, values) of layer i as tuples of one tensor per entry; `length` is the longest entry's P."""

    def index_for(self, rows: int) -> torch.Tensor:
        """[rows] int64: the entry each row of a batch of `rows` rows reads (ValueError when it cannot tell)."""

    def lengths_for(self, rows: int) -> torch.Tensor:
        """[rows] int64: P of the entry each row reads, where that row's sequence positions start."""


class PatchState(Protocol):
    """What a family's modules and attention function may use of the patch they serve (`patching` implements it).

    modules: attention kind -> the attention modules of that kind, in the order of the prefix's layers.
    prefixes: attention kind -> its prefix (kinds without one are absent).
    scratch: what one attention call leaves for a later one of the same forward (one dict per thread, so calls
        from several threads do not mix); emptied on unpatch.
    backend: the `backend=` of every `prefix_attention` call of the patched model.
    """

    modules: dict[str, list[nn.Module]]
    prefixes: dict[str, LayerPrefix]
    scratch: dict
    backend: str

    def position_shift(self, kind: str, rows: int) -> int | torch.Tensor:
        """Where the sequence positions of attention kind `kind` start, for a batch of `rows` rows: P of its
        prefix (0 when it has none), or for bank rows a [rows, 1] tensor of each row's entry's P; for levels
        their total length (a [rows, 1] tensor when the last level is bank rows)."""


@dataclass(frozen=True)
class Geometry:
    """What the prefix of one attention kind must look like: one [Hkv, P, D] pair per layer of that kind."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Site:
    """Where an attention call runs: the state of the patch, the attention kind and the layer within it."""

    state: PatchState
    kind: str
    layer: int


@dataclass(frozen=True)
class Family:
    """One family of HuggingFace models that share an attention design.

    kinds: attention kind -> what it is, in words (for messages); a bare prefix goes to the first kind.
    geometry(model) -> {kind: Geometry} for the kinds this model has.
    attention_modules(model) -> {kind: the attention modules of that kind, in the order of the prefix's layers}.
    attention(module, query, key, value, attention_mask, prefix_k, prefix_v, *, site, **kwargs) -> (out, None):
        the body of a transformers `AttentionInterface` function, given the layer's prefix ([Hkv, 0, D] when
        the kind has none) and the `Site` of the call.
    install(model, state) -> what the family changes in the model while it is patched, as objects with a
        `remove()` that undoes it (see `swap_class`).
    prompt_kv(model, input_ids [1, P]) -> (keys, values): each layer's keys and values of a prompt run once
        through the unpatched model at positions 0 .. P - 1, one [Hkv, P, D] tensor each (for
        `Prefix.from_prompt`); raises TypeError where a prompt's keys and values make no prefix.
    reads_banks: whether `attention` takes bank rows (`BankRowsPrefix`): then patching passes it the layer's
        entries as prefix_k, prefix_v (tuples) and `prefix_index=` [B], the entry of each row.
    reads_levels: whether `attention` takes levels of prefixes (`patch(model, [level0, level1, ...])`): then
        patching passes it prefix_k = prefix_v = None and `prefix_levels=`, the levels of the layer as
        `levels_prefix_attention` takes them.
    """

    name: str
    model_types: tuple[str, ...]
    kinds: dict[str, str]
    geometry: Callable[[nn.Module], dict[str, Geometry]]
    attention_modules: Callable[[nn.Module], dict[str, list[nn.Module]]]
    attention: Callable[..., tuple[torch.Tensor, None]]
    install: Callable[[nn.Module, PatchState], list[SwappedClass]]
    prompt_kv: Callable[[nn.Module, torch.Tensor], tuple[list[torch.Tensor], list[torch.Tensor]]]
    reads_banks: bool = False
    reads_levels: bool = False


def reduced_as(cls: type, state: dict):
    """What `__reduce_ex__` returns for an object to be copied or unpickled as an instance of `cls` with the
    attributes `state` (pickle's own reconstructor, so unpickling needs no fastprefix)."""
    return copyreg._reconstructor, (cls, object, None), state


class Swapped:
    """Mixin of the class `swap_class` gives a module while its model is patched. `patch_state` is the state of
    that patch. A copy or a pickle of the module is of the module's own class, so `copy.deepcopy` and
    `torch.save` of a patched model give the model unpatched."""

    _fastprefix_base: type
    _states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def patch_state(self) -> PatchState:
        return Swapped._states[self]()

    def __reduce_ex__(self, protocol):
        return reduced_as(self._fastprefix_base, self.__getstate__())


class SwappedClass:
    """What `swap_class` did; `remove()` gives the module its own class back."""

    def __init__(self, module: nn.Module, base: type):
        self.module, self.base = module, base

    def remove(self) -> None:
        Swapped._states.pop(self.module, None)
        self.module.__class__ = self.base


_SWAPPED_CLASSES: dict[tuple[type, type], type] = {}


def swap_class(module: nn.Module, mixin: type, state: PatchState) -> SwappedClass:
    """Give `module` the class `mixin` (a `Swapped`) + its own class, serving the patch `state` (held weakly:
    the model keeps its patch alive, not the other way round). The class keeps the module's class name."""
    base = type(module)
    if (mixin, base) not in _SWAPPED_CLASSES:
        _SWAPPED_CLASSES[mixin, base] = type(base.__name__, (mixin, base), {
            "_fastprefix_base": base, "__module__": base.__module__, "__qualname__": base.__qualname__})
    Swapped._states[module] = weakref.ref(state)
    module.__class__ = _SWAPPED_CLASSES[mixin, base]
    return SwappedClass(module, base)
