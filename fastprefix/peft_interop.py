"""`from_peft(peft_model)`: run a PEFT prefix-tuning model on fastprefix's patched attention.

PEFT 0.21 turns its prompt encoder's output into a per-row copy of the prefix ([B, P, 2 * layers * token_dim],
`get_prompt`) and puts it in a cache that every layer concatenates with its sequence keys. Here the prompt
encoder is called once per forward on the prefix tokens alone and its output is viewed, without a copy per
row, as [Hkv, P, D] key and value tensors (PEFT's own layout: 2 * layers slots, keys of layer l at slot 2l,
values at 2l + 1), placed where PEFT's cache places them:

* causal LM (`PeftModelForCausalLM`): layer l's self-attention attends to slots 2l, 2l + 1.
* seq2seq LM (`PeftModelForSeq2SeqLM`, T5) with `num_transformer_submodules=2`: PEFT duplicates the 2L slots,
  hands decoder layer l the four slots 4l .. 4l + 3 modulo 2L (self-attention keys, values, cross-attention
  keys, values) in an `EncoderDecoderCache`, then empties its cross-attention part. So decoder self-attention
  of layer l attends to slots 4l mod 2L and 4l + 1 mod 2L (with an even number of layers, the odd layers'
  slots are never used), and neither the encoder nor cross-attention sees a prefix.
* seq2seq LM with `num_transformer_submodules=1`: PEFT puts slots 2l, 2l + 1 in a plain `DynamicCache` that T5's
  decoder layer l shares between self- and cross-attention; fastprefix reproduces that (see
  `shared_cache_attention`), and `validate` warns about what it means.

The base model is patched (`patching`) until `unpatch()`, so gradients reach PEFT's own parameters, gradient
checkpointing works (the prefix is not in the cache that checkpointing disables), and `generate` keeps the
prefix out of its cache.

Several adapters in one batch: `adapter_names=[...]` (one adapter name per row, PEFT's convention for mixed
LoRA batches, "__base__" for a row without adapter) makes each adapter used a `PrefixBank` entry and row b
read adapter_names[b]'s (`bank.rows`), on a causal LM. PEFT 0.21.2 itself does not mix prefix-tuning
adapters: its forward ignores `adapter_names` (every row gets the active adapter) and its `generate` refuses
the argument.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .bank import BankRows, PrefixBank
from .compat import CACHE_ARGUMENTS
from .dispatch import check_backend, check_bank_backend
from .models import family_of, t5
from .models.base import reduced_as
from .patching import patch_family
from .prefix import Prefix
from .validate import PrefixConfigError, enum_value, validate

BASE_ADAPTER = "__base__"
"""PEFT's name, in `adapter_names`, for a row that runs the base model without adapter."""


def shared_cache_attention(module, query, key, value, attention_mask, prefix_k, prefix_v, *, site, **kwargs):
    """T5's `attention` as PEFT 0.21 runs T5 with `num_transformer_submodules=1`.

    PEFT then hands T5 a plain `DynamicCache` holding the prefix, and T5's decoder layer l uses that one cache
    layer for both attentions: self-attention appends the decoder's keys/values to it, then cross-attention
    appends the encoder's and attends to all of it. So cross-attention sees [prefix ; the decoder's keys of
    this layer, every position, later ones included ; the encoder's keys], without relative bias, the
    encoder's padding mask applying to encoder columns (PEFT itself fails on a padded encoder batch: its
    mask does not cover the extra columns). Self-attention stashes its keys and values (the cache's and this
    call's) for the cross-attention of the same layer, which runs next.
    """
    if site.kind == "decoder":
        site.state.scratch[("decoder_kv", site.layer)] = (key, value)
    elif site.kind == "cross":
        decoder_k, decoder_v = site.state.scratch.pop(("decoder_kv", site.layer))
        key, value = torch.cat([decoder_k, key], dim=2), torch.cat([decoder_v, value], dim=2)
        if attention_mask is not None:
            visible = attention_mask.new_ones(*attention_mask.shape[:-1], decoder_k.shape[2])
            attention_mask = torch.cat([visible, attention_mask], dim=-1)
    return t5.attention(module, query, key, value, attention_mask, prefix_k, prefix_v, site=site, **kwargs)


PEFT_SHARED_CACHE_FAMILY = dataclasses.replace(t5.FAMILY, name="T5 (PEFT's num_transformer_submodules=1 layout)",
                                               attention=shared_cache_attention)


def _reentrant_checkpointing(model: nn.Module) -> bool:
    """True if some layer will run under `torch.utils.checkpoint(..., use_reentrant=True)`."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            keywords = getattr(getattr(module, "_gradient_checkpointing_func", None), "keywords", {})
            if keywords.get("use_reentrant", False):
                return True
    return False


class PeftPrefixModel:
    """A PEFT prefix-tuning model (causal LM or seq2seq LM) whose prefix runs through fastprefix.

    `from_peft(peft_model)` gives `peft_model` itself this class, mixed into its own PEFT class (for
    `PeftModelForCausalLM`, `FastPrefixPeftModelForCausalLM`), so it stays a PEFT model to PEFT, transformers'
    `Trainer` and accelerate: the same object, parameters, state dict, `save_pretrained` and `load_adapter`
    (checkpoints are plain PEFT adapters), while its forward and `generate` attend to the prefix through
    fastprefix. `model(...)` takes the arguments of PEFT's forward and returns the base model's output
    (logits, loss); a `decoder_attention_mask` covers the decoder tokens only (PEFT prepends ones for its
    prefix itself); on a causal LM both take `adapter_names=[...]`, one adapter per row (`adapter_rows`).
    `unpatch()` gives the model back its own class and its base model its attention, exactly as before.
    """

    @property
    def peft_model(self):
        """The PEFT model (this very object)."""
        return self

    def prefix(self, adapter_name: str | None = None) -> Prefix | dict[str, Prefix]:
        """The prefix of adapter `adapter_name` (default: PEFT's active adapter) where PEFT places it (see the
        module docstring): a `Prefix` for a causal LM, {kind: Prefix} for a seq2seq LM; one [Hkv, P, D] key and
        value tensor per layer, views of the prompt encoder's output computed once (differentiable with respect
        to its parameters)."""
        name = self.active_adapter if adapter_name is None else adapter_name
        config = self.peft_config[name]
        encoder = self.prompt_encoder[name]
        P, layers, heads = config.num_virtual_tokens, config.num_layers, config.num_attention_heads
        if config.inference_mode:
            # As in PEFT's get_prompt: in inference mode the embedding holds the prefix itself.
            flat = encoder.embedding.weight
        else:
            tokens = self.prompt_tokens[name][:P].to(encoder.embedding.weight.device)
            flat = encoder(tokens)
        if self.base_model_torch_dtype is not None:
            flat = flat.to(self.base_model_torch_dtype)
        kv = flat.view(P, 2 * layers, heads, config.token_dim // heads).permute(1, 2, 0, 3)
        seq2seq, shared_cache = _layout(config)
        slots = key_slots(layers, seq2seq and not shared_cache)
        prefix = Prefix([kv[s] for s in slots], [kv[s + 1] for s in slots])
        if seq2seq:
            return {"decoder": prefix, "cross": prefix} if shared_cache else {"decoder": prefix}
        return prefix

    def adapter_rows(self, adapter_names, rows: int | None = None) -> BankRows:
        """The prefix of a batch whose row b attends to adapter adapter_names[b]'s: each adapter named is
        computed once (`prefix(name)`) as an entry of a `PrefixBank`, and row b reads its entry (`bank.rows`),
        nothing copied per row. `rows`: the batch's row count, when known. Every name is checked first (a list
        of `rows` names of prefix-tuning adapters of this model that fit it, on a causal LM, on a backend that
        reads a bank), before any compute. A row named "__base__" (`BASE_ADAPTER`) runs without adapter, as in
        PEFT's mixed LoRA batches."""
        names = self._checked_adapter_names(adapter_names, rows)
        used = list(dict.fromkeys(names))  # each adapter once, in order of first use
        bank = PrefixBank([self._no_prefix() if name == BASE_ADAPTER else self.prefix(name) for name in used])
        return bank.rows(torch.tensor([used.index(name) for name in names]))

    def _no_prefix(self) -> Prefix:
        """The prefix of a row without adapter (`BASE_ADAPTER`): P = 0, an empty [Hkv, 0, D] pair per layer."""
        base = self.get_base_model()
        g = family_of(base).geometry(base)["decoder"]
        nothing = torch.empty(g.num_kv_heads, 0, g.head_dim, dtype=base.dtype, device=base.device)
        return Prefix([nothing] * g.num_layers, [nothing] * g.num_layers)

    def _checked_adapter_names(self, adapter_names, rows: int | None) -> list[str]:
        """`adapter_names` as a list, or the error that says what is wrong with it and what to write."""
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
            got = type(adapter_names).__name__
            if isinstance(adapter_names, (list, tuple)):
                got = f"a {got} holding " + ", ".join(sorted({type(n).__name__ for n in adapter_names}))
            raise TypeError(f"fastprefix: `adapter_names` must be a list of adapter names (str), one per row of the "
                            f"batch, got {got}; write adapter_names=['name of row 0', 'name of row 1', ...].")
        if not adapter_names:
            raise ValueError("fastprefix: `adapter_names` is empty; give one adapter name per row of the batch.")
        if _layout(self.active_peft_config)[0]:
            raise TypeError(
                f"fastprefix: `adapter_names` mixes adapters by a prefix bank, which the LLaMA family reads only for "
                f"now, not {type(self.get_base_model()).__name__}; run the rows of each adapter as a batch of their "
                "own (model.set_adapter(name)).")
        check_bank_backend(self._fastprefix_handle.backend,
                           f"fastprefix: `adapter_names` on a model from from_peft(..., backend="
                           f"{self._fastprefix_handle.backend!r})")
        if rows is not None and len(adapter_names) != rows:
            raise ValueError(f"fastprefix: `adapter_names` has {len(adapter_names)} names but the batch has {rows} "
                             f"rows; give one adapter name per row ({rows}).")
        known = list(self.peft_config)
        for b, name in enumerate(adapter_names):
            if name not in self.peft_config and name != BASE_ADAPTER:
                raise ValueError(f"fastprefix: `adapter_names[{b}]` is {name!r}, which this model has no adapter of; "
                                 f"its adapters are {known}, and {BASE_ADAPTER!r} runs a row without adapter (add "
                                 "one with load_adapter(path, adapter_name=...) or add_adapter(name, config)).")
        base = self.get_base_model()
        for name in (n for n in dict.fromkeys(adapter_names) if n != BASE_ADAPTER):
            where = f"fastprefix: adapter {name!r} (in `adapter_names`)"
            try:
                validate(self.peft_config[name], base)
            except PrefixConfigError as error:
                raise PrefixConfigError(f"{where}: {error}", error.mismatches) from None
            except TypeError as error:
                raise TypeError(f"{where}: {error}") from None
        return list(adapter_names)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, task_ids=None, adapter_names=None, **kwargs):
        """PEFT's forward on fastprefix: the base model's output attending to the active adapter's prefix, or with
        `adapter_names` (one name per row; see `adapter_rows`) row b to adapter adapter_names[b]'s."""
        if task_ids is not None:
            raise ValueError("fastprefix: `task_ids` select a task of multitask prompt tuning; prefix tuning has "
                             "none. Drop the argument.")
        base = self.get_base_model()
        if base.training and torch.is_grad_enabled() and _reentrant_checkpointing(base):
            raise RuntimeError(
                "fastprefix: gradient checkpointing with use_reentrant=True runs a separate backward per layer, "
                "and each would go through the prompt encoder that computed the prefix (autograd frees it after "
                "the first). Enable it as "
                "model.gradient_checkpointing_enable() (non-reentrant, the transformers default) or with "
                "gradient_checkpointing_kwargs={'use_reentrant': False}."
            )
        rows = _rows_of(input_ids if input_ids is not None else inputs_embeds)
        prefix = self.prefix() if adapter_names is None else self.adapter_rows(adapter_names, rows)
        self._fastprefix_handle.set_prefix(prefix)
        return base(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
                    output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                    return_dict=return_dict, **kwargs)

    def generate(self, *args, adapter_names=None, **kwargs):
        """The base model's `generate` attending to the active adapter's prefix, or with `adapter_names` (one name
        per row of the inputs; see `adapter_rows`) row b to adapter adapter_names[b]'s (computed once, without
        gradient); num_beams and num_return_sequences repeat each row's adapter with the row.

        With PEFT's `num_transformer_submodules=1` layout on T5, cross-attention lets every decoder position see
        every other, so the states of earlier positions change with each new token and cannot be cached: the
        decoder then runs without a cache, over the whole sequence at every token (which is what greedy
        decoding by PEFT's forward computes).
        """
        if _layout(self.active_peft_config)[1]:
            given = ["use_cache=True"] * bool(kwargs.get("use_cache")) + [
                name for name in CACHE_ARGUMENTS if kwargs.get(name) is not None]
            if given:
                raise ValueError(
                    f"fastprefix: generate got {', '.join(given)}, but with num_transformer_submodules=1 every decoder "
                    "position's cross-attention sees the later positions too, so no cache can hold their states. "
                    "Drop the argument (the decoder then reruns over the sequence at every token), or train with "
                    "num_transformer_submodules=2."
                )
            kwargs["use_cache"] = False
        if adapter_names is None:
            with torch.no_grad():
                prefix = self.prefix()
        else:
            inputs = args[0] if args else next((kwargs[k] for k in ("inputs", "input_ids", "inputs_embeds")
                                                if kwargs.get(k) is not None), None)
            with torch.no_grad():
                prefix = self.adapter_rows(adapter_names, _rows_of(inputs))
        self._fastprefix_handle.set_prefix(prefix)
        return self.get_base_model().generate(*args, **kwargs)

    def unpatch(self) -> None:
        """Give the model back its own PEFT class and its base model its attention, exactly as before (what
        `fastprefix.unpatch(model)` does)."""
        self._fastprefix_handle.unpatch()
        self.__class__ = self._fastprefix_peft_class
        del self._fastprefix_handle, self._fastprefix_peft_class

    _fastprefix_unpatch = unpatch

    def __reduce_ex__(self, protocol):
        # Copies and pickles are of the PEFT class, without fastprefix (the base model's modules copy unpatched).
        state = {key: value for key, value in self.__getstate__().items() if not key.startswith("_fastprefix_")}
        return reduced_as(self._fastprefix_peft_class, state)


def _rows_of(inputs) -> int | None:
    """The batch's row count from its input ids or embeddings (None when neither is given)."""
    return inputs.shape[0] if isinstance(inputs, torch.Tensor) and inputs.dim() > 1 else None


def key_slots(num_layers: int, decoder_of_two_submodules: bool) -> list[int]:
    """The prompt-encoder slot PEFT gives layer l's keys (its values: the next slot): 2l, or for T5's decoder
    self-attention with num_transformer_submodules=2, 4l mod 2L (PEFT doubles the 2L slots and hands layer l
    four of them)."""
    step = 4 if decoder_of_two_submodules else 2
    return [step * layer % (2 * num_layers) for layer in range(num_layers)]


def _layout(config) -> tuple[bool, bool]:
    """(seq2seq, PEFT's shared-cache layout) of a PrefixTuningConfig."""
    seq2seq = enum_value(config.task_type) == "SEQ_2_SEQ_LM"
    return seq2seq, seq2seq and config.num_transformer_submodules == 1


_FAST_CLASSES: dict[type, type] = {}


def _fast_class(peft_class: type) -> type:
    """`PeftPrefixModel` mixed into `peft_class` (one class per PEFT class)."""
    if peft_class not in _FAST_CLASSES:
        _FAST_CLASSES[peft_class] = type(f"FastPrefix{peft_class.__name__}", (PeftPrefixModel, peft_class),
                                         {"__module__": __name__})
    return _FAST_CLASSES[peft_class]


def from_peft(peft_model, *, backend: str = "auto"):
    """Make a `PeftModelForCausalLM` or `PeftModelForSeq2SeqLM` with a `PrefixTuningConfig` run on fastprefix
    (see `PeftPrefixModel`), every attention call on `backend` (as in `patch`), and return it. Checks the
    config against the model first (`validate`), so a config PEFT would fail on deep inside a forward is refused
    here with the fix. A model already made so is returned as it is; `fastprefix.unpatch(peft_model)` (or
    `peft_model.unpatch()`) undoes it."""
    from peft import PeftModelForCausalLM, PeftModelForSeq2SeqLM

    if isinstance(peft_model, PeftPrefixModel):
        return peft_model
    if not isinstance(peft_model, (PeftModelForCausalLM, PeftModelForSeq2SeqLM)):
        raise TypeError(
            f"fastprefix.from_peft: expected a peft PeftModelForCausalLM or PeftModelForSeq2SeqLM (get_peft_model("
            f"model, PrefixTuningConfig(task_type='CAUSAL_LM' or 'SEQ_2_SEQ_LM', ...))), got "
            f"{type(peft_model).__name__}."
        )
    validate(peft_model.active_peft_config, peft_model.get_base_model())
    check_backend(backend, peft_model.get_base_model().device, "fastprefix.from_peft")
    peft_class = type(peft_model)
    peft_model.__class__ = _fast_class(peft_class)
    family = PEFT_SHARED_CACHE_FAMILY if _layout(peft_model.active_peft_config)[1] else family_of(
        peft_model.get_base_model())
    try:
        with torch.no_grad():
            handle = patch_family(peft_model.get_base_model(), peft_model.prefix(), family, backend)
    except BaseException:
        peft_model.__class__ = peft_class
        raise
    peft_model._fastprefix_handle, peft_model._fastprefix_peft_class = handle, peft_class
    return peft_model
