"""`Prefix`: the keys and values a model attends to before its sequence, one pair per attention layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .checks import shape_text
from .dispatch import check_backend
from .models import ATTN_IMPLEMENTATION, family_of, signature
from .patching import patch

_LAYOUT = "[Hkv, P, D] (shared by every row) or [B, Hkv, P, D] (one per row)"
_FORMAT = "fastprefix-prefix-1"


class Prefix:
    """Prefix keys and values for every attention layer of a model.

    `keys[i]` and `values[i]` are what layer i attends to before the sequence: [Hkv, P, D] shared by every
    row of a batch (stored once, never copied per row), or [B, Hkv, P, D] one per row. Keys are stored as
    the layer would see them after its rotary embedding (what PEFT's prefix tuning stores and what a
    prompt's KV cache holds): patched models rotate only sequence keys, and place the sequence at positions
    P, P + 1, ...

    All layers must share one shape, dtype and device. Tensors are kept as given (views included), so a
    prefix computed by a module keeps its autograd graph. `source`: the `models.signature` of the model the
    keys and values come from, when known (`from_prompt` sets it, `save` and `load` keep it); `patch` refuses
    the prefix on a model with another. `prompt_ids`: the prompt's token ids [P] when the keys and values are a
    prompt's, at positions start .. start + P - 1 (`from_prompt` sets it): a sliding window then hides them as it
    hides the prompt in plain transformers, and `fastprefix.SeesPrompt` shows them to logits processors. Without
    it (a learned prefix) the prefix is always visible. `start`: the position of the prefix's first token, 0 but for
    a level of a cascade: `from_prompt(model, ids, after=levels)` computes the prompt as the continuation of
    `levels` and sets it to their total length; such a prefix is patched after those levels only
    (`patch(model, [*levels, prefix])`).
    """

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *, source: str | None = None,
                 prompt_ids: torch.Tensor | None = None, start: int = 0):
        for name, seq in (("keys", keys), ("values", values)):
            if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
                raise TypeError(
                    f"Prefix: `{name}` must be a list with one tensor per attention layer, got "
                    f"{type(seq).__name__}. For a single layer write Prefix([k], [v])."
                )
            if len(seq) == 0:
                raise ValueError(f"Prefix: `{name}` is empty; give one tensor per attention layer.")
            for i, t in enumerate(seq):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"Prefix: `{name}[{i}]` must be a torch.Tensor, got {type(t).__name__}.")
        if len(keys) != len(values):
            raise ValueError(
                f"Prefix: got {len(keys)} key tensors and {len(values)} value tensors; give one of each per layer."
            )
        first = keys[0]
        if first.dim() not in (3, 4):
            raise ValueError(f"Prefix: `keys[0]` must be {_LAYOUT}, got shape {shape_text(first)}.")
        if not first.is_floating_point():
            raise TypeError(f"Prefix: `keys[0]` must be a floating-point tensor, got {first.dtype}.")
        for name, seq in (("keys", keys), ("values", values)):
            for i, t in enumerate(seq):
                if t.shape != first.shape:
                    raise ValueError(
                        f"Prefix: `{name}[{i}]` has shape {shape_text(t)} but `keys[0]` has {shape_text(first)}; every "
                        f"layer's keys and values must share one shape {_LAYOUT}."
                    )
                if t.dtype != first.dtype or t.device != first.device:
                    raise ValueError(
                        f"Prefix: `{name}[{i}]` is {t.dtype} on {t.device} but `keys[0]` is {first.dtype} on "
                        f"{first.device}; move every layer to one dtype and device."
                    )
        if prompt_ids is not None and (prompt_ids.dim() != 1 or prompt_ids.shape[0] != first.shape[-2]
                                       or prompt_ids.is_floating_point()):
            raise ValueError(f"Prefix: `prompt_ids` must be the prompt's P = {first.shape[-2]} token ids, an integer "
                             f"tensor [P]; got {prompt_ids.dtype} of shape {shape_text(prompt_ids)}.")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"Prefix: `start` must be a non-negative int (the position of the first token), got "
                             f"{start!r}.")
        self.keys: tuple[torch.Tensor, ...] = tuple(keys)
        self.values: tuple[torch.Tensor, ...] = tuple(values)
        self.source = source
        self.prompt_ids = None if prompt_ids is None else prompt_ids.detach().to("cpu", torch.long)
        self.start = start

    @classmethod
    def from_prompt(cls, model, input_ids: torch.Tensor, *, after=None, backend: str = "auto") -> Prefix:
        """The keys and values of a shared prompt, computed once, as a shared prefix.

        `model` is an unpatched model of a registered decoder-only family (LLaMA, Mistral, Qwen2);
        `input_ids` is the prompt, [P] or [1, P]. The prompt runs once through the model at positions
        0 ... P - 1, and each layer's keys (after the rotary embedding) and values become one [Hkv, P, D]
        tensor. Then `with fastprefix.patched(model, prefix): model.generate(suffix_ids, attention_mask=...)`
        generates every row as if it were [prompt ; suffix_row], the prompt's keys and values stored once
        for the whole batch and never in the rows' cache. Computed without gradient, with the prompt's attention
        run by `prefix_attention` on `backend` (as in `fastprefix.patch`).

        `after`: a shared Prefix of this model, or a list of levels [level0, level1, ...] (shared Prefixes, as
        `fastprefix.patch` takes them). The prompt is then computed as their continuation: its tokens attend to
        them (and to the prompt's earlier tokens) at positions L .. L + P - 1, L the levels' total length, which
        becomes the prefix's `start`. `patched(model, [*levels, prefix])` then runs each row as
        [levels' prompts ; prompt ; row]; prefixes computed after the same levels make a `PrefixBank` whose rows
        are the last level.
        """
        family = family_of(model)
        if getattr(model.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION:
            raise RuntimeError(
                "Prefix.from_prompt: the model is patched by fastprefix, so the prompt would attend to the current "
                "prefix; compute the prompt's prefix before patching (or after handle.unpatch())."
            )
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"Prefix.from_prompt: `input_ids` must be an integer tensor of token ids, got "
                            f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}.")
        ids = input_ids[None] if input_ids.dim() == 1 else input_ids
        if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
            raise ValueError(
                f"Prefix.from_prompt: `input_ids` must be one non-empty prompt, [P] or [1, P], got shape "
                f"{shape_text(input_ids)}. For a prompt per row, build Prefix([B, Hkv, P, D] tensors) yourself."
            )
        check_backend(backend, model.device, "Prefix.from_prompt")
        levels = _levels_before(after)
        context = levels or {}
        if not levels:
            for kind, g in family.geometry(model).items():
                nothing = torch.empty(g.num_kv_heads, 0, g.head_dim, dtype=model.dtype, device=model.device)
                context[kind] = cls([nothing] * g.num_layers, [nothing] * g.num_layers)
        try:
            handle = patch(model, context, backend=backend)
        except (TypeError, ValueError) as error:
            if not levels:
                raise
            raise type(error)(f"Prefix.from_prompt: `after` does not fit the model: {error}") from None
        try:
            with torch.no_grad():
                return cls(*family.prompt_kv(model, ids), source=signature(model), prompt_ids=ids[0],
                           start=sum(level.length for level in levels))
        finally:
            handle.unpatch()

    def save(self, path) -> None:
        """Write the keys and values to a safetensors file at `path`, with what `load` and `patch` check: the
        layer count, KV heads, P, head dim, dtype, layout and `source` (and `prompt_ids`). Another process can
        `load` it instead of running the prompt again. `start` is kept too."""
        from safetensors.torch import save_file

        tensors = {f"{name}.{i}": t.detach().contiguous()
                   for name, seq in (("keys", self.keys), ("values", self.values)) for i, t in enumerate(seq)}
        if self.prompt_ids is not None:
            tensors["prompt_ids"] = self.prompt_ids
        metadata = dict(format=_FORMAT, layers=self.num_layers, kv_heads=self.num_kv_heads, length=self.length,
                        head_dim=self.head_dim, dtype=str(self.dtype).removeprefix("torch."), shared=self.shared,
                        source=self.source or "", start=self.start)
        save_file(tensors, str(path), metadata={key: str(value) for key, value in metadata.items()})

    @classmethod
    def load(cls, path, device=None) -> Prefix:
        """The prefix `save` wrote to `path`, on `device` (default: the CPU)."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device or "cpu")) as f:
            metadata = f.metadata() or {}
            if metadata.get("format") != _FORMAT:
                raise ValueError(f"Prefix.load: {path} is not a prefix written by Prefix.save (its metadata names no "
                                 f"{_FORMAT!r} format); a PEFT adapter directory loads with "
                                 "TrainablePrefix.from_pretrained or peft.PeftModel.from_pretrained.")
            layers = int(metadata["layers"])
            keys = [f.get_tensor(f"keys.{i}") for i in range(layers)]
            values = [f.get_tensor(f"values.{i}") for i in range(layers)]
            prompt_ids = f.get_tensor("prompt_ids") if "prompt_ids" in f.keys() else None
        return cls(keys, values, source=metadata["source"] or None, prompt_ids=prompt_ids,
                   start=int(metadata.get("start", 0)))

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def shared(self) -> bool:
        """True for [Hkv, P, D] tensors shared by every row of a batch."""
        return self.keys[0].dim() == 3

    @property
    def batch_size(self) -> int | None:
        """Rows of a per-row prefix; None when shared."""
        return None if self.shared else self.keys[0].shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.keys[0].shape[-3]

    @property
    def length(self) -> int:
        """P, the number of prefix positions."""
        return self.keys[0].shape[-2]

    @property
    def head_dim(self) -> int:
        return self.keys[0].shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) of layer i."""
        return self.keys[i], self.values[i]

    def __repr__(self) -> str:
        rows = "shared" if self.shared else f"B={self.batch_size}"
        start = f"start={self.start}, " if self.start else ""
        return (f"Prefix(layers={self.num_layers}, Hkv={self.num_kv_heads}, P={self.length}, D={self.head_dim}, "
                f"{start}{rows}, {self.dtype}, {self.device})")


def _levels_before(after) -> list[Prefix]:
    """The levels `Prefix.from_prompt(..., after=after)` continues: [] for None, else a list of shared Prefixes."""
    if after is None:
        return []
    levels = list(after) if isinstance(after, (list, tuple)) else [after]
    for i, level in enumerate(levels):
        if not isinstance(level, Prefix) or not level.shared:
            got = f"a per-row Prefix (B={level.batch_size})" if isinstance(level, Prefix) else type(level).__name__
            raise TypeError(f"Prefix.from_prompt: `after` must be a shared Prefix or a list of shared Prefixes (the "
                            f"levels the prompt continues); item {i} is {got}. A prompt continues one context: for a "
                            "prompt per document, call from_prompt once per document (each after= the same levels) and "
                            "put the results in a PrefixBank.")
    if not levels:
        raise ValueError("Prefix.from_prompt: `after` is an empty list; give the levels the prompt continues, or leave "
                         "`after` out for a prompt at positions 0 .. P - 1.")
    return levels
