"""`TrainablePrefix`: prefix tuning without PEFT, with a prefix in any attention kind a model has.

PEFT 0.21 can place a T5 prefix in decoder self-attention only. The encoder-decoder setting of the
prefix-tuning paper (Li & Liang 2021) puts one in the encoder, in decoder self-attention and in
cross-attention; this module holds such a prefix as parameters, and `fastprefix.patch` runs it.

Saved (`save_pretrained`) as a PEFT prefix-tuning adapter wherever PEFT can express the prefix, so PEFT users
load it with `PeftModel.from_pretrained`: a decoder-only model's, and T5's decoder self-attention alone when
its decoder has an odd number of layers (PEFT's `num_transformer_submodules=2` layout hands decoder layer l the
slots of layer 2l mod L, so with an even count two layers share one). Everything else is saved in fastprefix's
own format. `from_pretrained` reads both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .dispatch import check_backend
from .models import family_of, signature
from .patching import PatchHandle, patch, patched
from .peft_interop import key_slots
from .prefix import Prefix
from .validate import enum_value, validate

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
OWN_WEIGHTS = "fastprefix_prefix.safetensors"
_FORMAT = "fastprefix-trainable-prefix-1"


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

    Save it with `save_pretrained(directory)` (see the module docstring) and load it with
    `TrainablePrefix.from_pretrained(directory, model)`; `state_dict()` names are `prefix_keys.<kind>.<layer>`
    and `prefix_values.<kind>.<layer>`.
    """

    def __init__(self, model, length: int, kinds=None, *, backend: str = "auto"):
        super().__init__()
        check_backend(backend, model.device, "TrainablePrefix")
        self.backend, self.source = backend, signature(model)
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        geometry = family_of(model).geometry(model)
        kinds = tuple(geometry) if kinds is None else (kinds,) if isinstance(kinds, str) else tuple(kinds)
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
        return {kind: Prefix(list(self.prefix_keys[kind]), list(self.prefix_values[kind]), source=self.source)
                for kind in self.prefix_keys}

    def patch(self, model) -> PatchHandle:
        """`fastprefix.patch(model, self.prefix(), backend=self.backend)`."""
        return patch(model, self.prefix(), backend=self.backend)

    def patched(self, model):
        """`fastprefix.patched(model, self.prefix(), backend=self.backend)`: patched for a `with` block."""
        return patched(model, self.prefix(), backend=self.backend)

    @property
    def length(self) -> int:
        return next(iter(self.prefix_keys.values()))[0].shape[1]

    def _peft_slots(self) -> list[int] | None:
        """PEFT's slot of each decoder layer's keys if PEFT's format can hold this prefix, else None."""
        if tuple(self.prefix_keys) != ("decoder",):
            return None
        slots = key_slots(len(self.prefix_keys["decoder"]), self.seq2seq)
        return slots if len(set(slots)) == len(slots) else None

    def save_pretrained(self, directory) -> None:
        """Write the prefix to `directory`: as a PEFT prefix-tuning adapter (adapter_config.json and
        adapter_model.safetensors) where PEFT can express it, else in fastprefix's format
        (fastprefix_prefix.safetensors with its kinds, length and model signature)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        slots = self._peft_slots()
        if slots is None:
            metadata = dict(format=_FORMAT, kinds=",".join(self.prefix_keys), length=str(self.length),
                            source=self.source)
            save_file({name: p.detach().contiguous() for name, p in self.state_dict().items()},
                      str(directory / OWN_WEIGHTS), metadata=metadata)
            return
        from peft import PrefixTuningConfig

        keys, values = self.prefix_keys["decoder"], self.prefix_values["decoder"]
        heads, P, head_dim = keys[0].shape
        kv = torch.empty(2 * len(keys), heads, P, head_dim, dtype=keys[0].dtype)
        for slot, k, v in zip(slots, keys, values):
            kv[slot], kv[slot + 1] = k.detach().cpu(), v.detach().cpu()
        config = PrefixTuningConfig(task_type="SEQ_2_SEQ_LM" if self.seq2seq else "CAUSAL_LM", num_virtual_tokens=P,
                                    num_layers=len(keys), token_dim=heads * head_dim, num_attention_heads=heads,
                                    num_transformer_submodules=2 if self.seq2seq else 1, inference_mode=True)
        config.save_pretrained(str(directory))
        save_file({"prompt_embeddings": kv.permute(2, 0, 1, 3).reshape(P, -1).contiguous()},
                  str(directory / ADAPTER_WEIGHTS))

    @classmethod
    def from_pretrained(cls, directory, model, *, backend: str = "auto") -> TrainablePrefix:
        """The prefix `save_pretrained` wrote to `directory` (or any PEFT prefix-tuning adapter without prefix
        projection), for `model`. Everything is checked against the model before anything is built."""
        directory = Path(directory)
        if (directory / ADAPTER_CONFIG).is_file():
            return _from_peft_adapter(cls, directory, model, backend)
        if (directory / OWN_WEIGHTS).is_file():
            return _from_own_format(cls, directory, model, backend)
        raise ValueError(f"TrainablePrefix.from_pretrained: {directory} holds neither a PEFT prefix-tuning adapter "
                         f"({ADAPTER_CONFIG}) nor a TrainablePrefix ({OWN_WEIGHTS}); write one with "
                         "trainable.save_pretrained(directory) or peft_model.save_pretrained(directory).")


def _from_own_format(cls, directory: Path, model, backend: str) -> TrainablePrefix:
    from safetensors import safe_open

    with safe_open(str(directory / OWN_WEIGHTS), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"TrainablePrefix.from_pretrained: {directory / OWN_WEIGHTS} was not written by "
                             "TrainablePrefix.save_pretrained (no format in its metadata).")
        if metadata["source"] != signature(model):
            raise ValueError(f"TrainablePrefix.from_pretrained: the prefix in {directory} was trained on a model of "
                             f"signature {metadata['source']}, but {type(model).__name__} has {signature(model)} "
                             "(another model type or config).")
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    trainable = cls(model, int(metadata["length"]), metadata["kinds"].split(","), backend=backend)
    with torch.no_grad():
        trainable.load_state_dict(tensors)
    return trainable


def _from_peft_adapter(cls, directory: Path, model, backend: str) -> TrainablePrefix:
    from peft import PeftConfig
    from safetensors.torch import load_file

    config = PeftConfig.from_pretrained(str(directory))
    if enum_value(config.peft_type) != "PREFIX_TUNING":
        raise ValueError(f"TrainablePrefix.from_pretrained: {directory} holds a {enum_value(config.peft_type)} "
                         "adapter, not prefix tuning.")
    shared_cache = model.config.is_encoder_decoder and config.num_transformer_submodules == 1
    if config.prefix_projection or shared_cache:
        raise ValueError(
            f"TrainablePrefix.from_pretrained: the adapter in {directory} "
            + ("projects its prefix through an MLP" if config.prefix_projection else
               "shares one cache between T5's self- and cross-attention (num_transformer_submodules=1)")
            + ", which a TrainablePrefix cannot hold; load it with peft.PeftModel.from_pretrained(model, directory) "
            "and run it with fastprefix.from_peft.")
    validate(config, model)
    weights = load_file(str(directory / ADAPTER_WEIGHTS))
    flat = weights["prompt_embeddings"]
    layers, heads, P = config.num_layers, config.num_attention_heads, config.num_virtual_tokens
    kv = flat.view(P, 2 * layers, heads, config.token_dim // heads).permute(1, 2, 0, 3)
    trainable = cls(model, P, ("decoder",), backend=backend)
    with torch.no_grad():
        for layer, slot in enumerate(key_slots(layers, bool(model.config.is_encoder_decoder))):
            trainable.prefix_keys["decoder"][layer].copy_(kv[slot])
            trainable.prefix_values["decoder"][layer].copy_(kv[slot + 1])
    return trainable
