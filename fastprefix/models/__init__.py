"""Model families fastprefix can patch. Each family module describes one attention design to `patching`.

A model has one or more attention *kinds*, each of which may attend to its own `Prefix`: a decoder-only
model has one ("decoder", every self-attention layer); T5 has three ("decoder" self-attention, "encoder"
self-attention, "cross" decoder-to-encoder attention). A bare `Prefix` goes to a family's first kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from ..patching import PatchHandle


@dataclass(frozen=True)
class Geometry:
    """What the `Prefix` of one attention kind must look like: one [Hkv, P, D] pair per layer of that kind."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Site:
    """Where an attention call runs: the handle of the patch, the attention kind and the layer within it."""

    handle: PatchHandle
    kind: str
    layer: int


@dataclass(frozen=True)
class Family:
    """One family of HuggingFace models that share an attention design.

    kinds: attention kind -> what it is, in words (for messages); a bare `Prefix` goes to the first kind.
    geometry(model) -> {kind: Geometry} for the kinds this model has.
    attention_modules(model) -> {kind: the attention modules of that kind, in the order of the prefix's layers}.
    attention(module, query, key, value, attention_mask, prefix_k, prefix_v, *, site, **kwargs) -> (out, None):
        the body of a transformers `AttentionInterface` function, given the layer's prefix ([Hkv, 0, D] when
        the kind has none) and the `Site` of the call.
    install(model, handle) -> the hooks the family needs while the model is patched (removed by unpatch).
    """

    name: str
    model_types: tuple[str, ...]
    kinds: dict[str, str]
    geometry: Callable[[nn.Module], dict[str, Geometry]]
    attention_modules: Callable[[nn.Module], dict[str, list[nn.Module]]]
    attention: Callable[..., tuple[torch.Tensor, None]]
    install: Callable[[nn.Module, PatchHandle], list[RemovableHandle]]
