"""`TrainablePrefix`: prefix tuning without PEFT, with a prefix in any attention kind a model has.

PEFT 0.21 can place a T5 prefix in decoder self-attention only. The encoder-decoder setting of the
prefix-tuning paper (Li & Liang 2021) puts one in the encoder, in decoder self-attention and in
cross-attention; this module holds such a prefix as parameters, and `fastprefix.patch` runs it.
"""

from __future__ import annotations

import torch
from torch import nn

from .dispatch import check_backend
from .models import family_of
from .patching import PatchHandle, patch, patched
from .prefix import Prefix


class TrainablePrefix(nn.Module):
    """Trainable prefix keys and values, one [Hkv, P, D] key and value parameter per layer of each attention kind.

    Args:
        model: a model of a registered family (e.g. T5ForConditionalGeneration); fixes Hkv, D, the layers
            per kind, the dtype and the device.
        length: P, the number of prefix positions (the same for every kind).
        kinds: the attention kinds that get a prefix; default every kind the model has (T5: "decoder",
            "encoder", "cross"; a decoder-only model: "decoder"). Kinds left out attend to their sequence alone.
        backend: the backend of the attention calls when a model is patched with `patch` or `patched` (as in
            `fastprefix.patch`).

    Parameters are drawn from a standard normal, as T5's own keys and values are distributed at
    initialization; re-initialize them (`torch.nn.init`) as the task needs. `prefix()` returns {kind: Prefix}
    over the parameters themselves, so a model patched with it follows every optimizer step:

        trainable = fastprefix.TrainablePrefix(model, length=20)
        model.requires_grad_(False)
        optimizer = torch.optim.AdamW(trainable.parameters(), lr=1e-2)
        with trainable.patched(model):              # fastprefix.patched(model, trainable.prefix(), backend=...)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()

    Save and load it with `state_dict()` / `load_state_dict()`; parameter names are
    `prefix_keys.<kind>.<layer>` and `prefix_values.<kind>.<layer>`.
    """

    def __init__(self, model, length: int, kinds=None, *, backend: str = "auto"):
        super().__init__()
        check_backend(backend, model.device, "TrainablePrefix")
        self.backend = backend
        geometry = family_of(model).geometry(model)
        kinds = tuple(geometry) if kinds is None else tuple(kinds)
        unknown = [kind for kind in kinds if kind not in geometry]
        if unknown or not kinds:
            raise ValueError(f"TrainablePrefix: `kinds` must name attention kinds of {type(model).__name__} among "
                             f"{list(geometry)}; got {list(kinds)}.")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"TrainablePrefix: `length` must be a positive int (P), got {length!r}.")

        def parameters(kind):
            g = geometry[kind]
            return nn.ParameterList(
                torch.randn(g.num_kv_heads, length, g.head_dim, dtype=model.dtype, device=model.device)
                for _ in range(g.num_layers))

        self.prefix_keys = nn.ModuleDict({kind: parameters(kind) for kind in kinds})
        self.prefix_values = nn.ModuleDict({kind: parameters(kind) for kind in kinds})

    def prefix(self) -> dict[str, Prefix]:
        """{kind: Prefix} of the parameters (not copies), for `fastprefix.patch`."""
        return {kind: Prefix(list(self.prefix_keys[kind]), list(self.prefix_values[kind]))
                for kind in self.prefix_keys}

    def patch(self, model) -> PatchHandle:
        """`fastprefix.patch(model, self.prefix(), backend=self.backend)`."""
        return patch(model, self.prefix(), backend=self.backend)

    def patched(self, model):
        """`fastprefix.patched(model, self.prefix(), backend=self.backend)`: patched for a `with` block."""
        return patched(model, self.prefix(), backend=self.backend)
