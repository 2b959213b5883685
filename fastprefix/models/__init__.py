"""Model families fastprefix can patch. Each family module describes one attention design to `patching`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@dataclass(frozen=True)
class Geometry:
    """What a model's `Prefix` must look like: one [Hkv, P, D] pair per attention layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Family:
    """One family of HuggingFace models that share an attention design.

    attention_modules(model) -> the attention modules, in the order of the prefix's layers.
    attention(module, query, key, value, attention_mask, prefix_k, prefix_v, **kwargs) -> (out, None):
        the body of a transformers `AttentionInterface` function, given the layer's prefix.
    offset_positions(model, offset) -> a removable hook placing sequence tokens at positions offset() + ...
    """

    name: str
    model_types: tuple[str, ...]
    geometry: Callable[[nn.Module], Geometry]
    attention_modules: Callable[[nn.Module], list[nn.Module]]
    attention: Callable[..., tuple[torch.Tensor, None]]
    offset_positions: Callable[[nn.Module, Callable[[], int]], RemovableHandle]
