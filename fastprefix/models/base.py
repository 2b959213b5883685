"""What a model family is, for `patching`: its attention kinds, where their modules are, the attention function
it registers, the hooks it needs, and how it runs a prompt; and the per-patch state its code may use.

A model has one or more attention *kinds*, each of which may attend to its own prefix: a decoder-only model
has one ("decoder", every self-attention layer); T5 has three ("decoder" self-attention, "encoder"
self-attention, "cross" decoder-to-encoder attention). A bare prefix goes to a family's first kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


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

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of layer i."""


class PatchState(Protocol):
    """What a family's hooks and attention function may use of the patch they serve (`patching` implements it).

    modules: attention kind -> the attention modules of that kind, in the order of the prefix's layers.
    scratch: what the family's hooks record during a forward for its attention function; emptied on unpatch.
    backend: the `backend=` of every `prefix_attention` call of the patched model.
    """

    modules: dict[str, list[nn.Module]]
    scratch: dict
    backend: str

    def prefix_length(self, kind: str) -> int:
        """P of the prefix of attention kind `kind`; 0 when the kind has none."""


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
    install(model, state) -> the hooks the family needs while the model is patched (removed by unpatch).
    prompt_kv(model, input_ids [1, P]) -> (keys, values): each layer's keys and values of a prompt run once
        through the unpatched model at positions 0 .. P - 1, one [Hkv, P, D] tensor each (for
        `Prefix.from_prompt`); raises TypeError where a prompt's keys and values make no prefix.
    """

    name: str
    model_types: tuple[str, ...]
    kinds: dict[str, str]
    geometry: Callable[[nn.Module], dict[str, Geometry]]
    attention_modules: Callable[[nn.Module], dict[str, list[nn.Module]]]
    attention: Callable[..., tuple[torch.Tensor, None]]
    install: Callable[[nn.Module, PatchState], list[RemovableHandle]]
    prompt_kv: Callable[[nn.Module, torch.Tensor], tuple[list[torch.Tensor], list[torch.Tensor]]]
