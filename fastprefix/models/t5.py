"""T5 and mT5 (T5ForConditionalGeneration, T5Model, T5EncoderModel and their MT5 twins; one code base).

Three attention kinds, each of which may attend to its own prefix:

* "decoder": decoder self-attention, causal (where PEFT's prefix tuning puts its prefix);
* "encoder": encoder self-attention;
* "cross": decoder cross-attention over the encoder's output.

Every `T5Attention` module projects q, k, v, updates the cache with the sequence keys (cross-attention caches
the encoder's), computes or receives `position_bias`, then hands q, k, v, the mask and `position_bias` to the
function `config._attn_implementation` names. fastprefix's function (see `attention`) adds the layer's
prefix through `prefix_attention`; no cache ever holds it. T5 specifics:

* No score scaling: the module passes `scaling=1.0`.
* Relative position bias. Layer 0 of each stack owns `relative_attention_bias` and computes `position_bias`
  [1, H, N, S] for the sequence keys, with query i at position `past + i` (`past`: the tokens the decoder's
  cache held before this call; 0 in the encoder); every later layer of the stack reuses it. Prefix columns
  get the bias of the positions just before the sequence: from query i to prefix slot m the relative
  position is m - P - (past + i), bucketed by the stack's layer-0 module with its own `bidirectional` flag
  (`T5Attention.compute_bias`, True in the encoder, False in the decoder). This is what PEFT's cache
  produces, its prefix sitting in cache slots 0 .. P - 1. The bias handed to `prefix_attention` is
  [1, H, N, P + S], one copy for the whole batch. Each self-attention module, given the class `RecordsPast`
  while patched, passes `past` to the attention function with its call (with a static cache the key length
  is the cache's capacity, so `past` cannot be read off the keys).
* Cross-attention has no relative bias (T5 passes zeros): none is applied, to prefix or encoder columns.
* Dropout: the module passes `dropout_rate` in training mode (0 in eval), applied to the attention
  probabilities of all P + S columns.
"""

from __future__ import annotations

import torch
from torch import nn

from ..compat import passed_cache
from ..ops import prefix_attention
from .base import Family, Geometry, PatchState, Swapped, SwappedClass, swap_class

KINDS = {"decoder": "decoder self-attention", "encoder": "encoder self-attention",
         "cross": "decoder cross-attention"}


def attention_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    base = model.base_model
    decoder = getattr(base, "decoder", None)
    modules = {}
    if decoder is not None:
        modules["decoder"] = [block.layer[0].SelfAttention for block in decoder.block]
    modules["encoder"] = [block.layer[0].SelfAttention for block in base.encoder.block]
    if decoder is not None:
        modules["cross"] = [block.layer[1].EncDecAttention for block in decoder.block]
    return modules


def geometry(model: nn.Module) -> dict[str, Geometry]:
    """Per kind: as many layers as its stack (the decoder has config.num_decoder_layers), num_heads heads of
    d_kv (T5 has no grouped-query attention; num_heads * d_kv need not equal d_model)."""
    config = model.config
    return {kind: Geometry(num_layers=len(modules), num_kv_heads=config.num_heads, head_dim=config.d_kv)
            for kind, modules in attention_modules(model).items()}


def prefix_position_bias(site, length: int, query_length: int, past, device) -> torch.Tensor:
    """[1, H, query_length, length]: T5's bias from query i (at position past + i) to prefix slot m, at
    relative position m - length - (past + i), from the layer-0 module of the query's stack."""
    first = site.state.modules[site.kind][0]
    return first.compute_bias(query_length, length, device=device, past_seen_tokens=past + length)


def extended_bias(site, position_bias, length: int, past, query) -> torch.Tensor:
    """`position_bias` [1, H, N, S] with the prefix columns' bias before it: [1, H, N, length + S] in query's
    dtype. Every layer of a stack receives the `position_bias` tensor its layer 0 computed, so the result is
    computed once per forward and kept, with that tensor, in this thread's scratch for the stack's later
    layers (until the next forward or unpatch)."""
    held = site.state.scratch.get(("bias", site.kind))
    if held is not None and held[0] is position_bias and held[1] == length and held[2].dtype == query.dtype:
        return held[2]
    bias = position_bias.to(query.dtype)
    if length:
        prefix_bias = prefix_position_bias(site, length, query.shape[2], past, query.device).to(query.dtype)
        bias = torch.cat([prefix_bias, bias], dim=-1)
    site.state.scratch[("bias", site.kind)] = (position_bias, length, bias)
    return bias


def attention(module, query, key, value, attention_mask, prefix_k, prefix_v, *, site, scaling, dropout=0.0,
              position_bias=None, fastprefix_past=0, **kwargs):
    """transformers' T5 `sdpa_attention_forward`, with the layer's prefix before the sequence keys.

    The mask comes from `sdpa_mask` (patching registers it for fastprefix): a bool [B, 1, N or 1, S] over
    the sequence keys (True = attend), or None. For decoder self-attention None means plain causal, as in
    transformers' SDPA path (top-left aligned, which only differs from bottom-right when an empty static
    cache holds more slots than queries; keys and bias are then cropped to N, as transformers does). Prefix
    columns are always visible, as in PEFT's decoder attention mask, whose prefix entries are ones.
    `position_bias` [1, H, N, S] (sequence columns) is extended by the prefix columns' bias (see the module
    docstring; `fastprefix_past` comes from `RecordsPast`); cross-attention gets none. `kwargs`
    (`output_attentions`, ...) are not used.
    """
    P, N = prefix_k.shape[-2], query.shape[2]
    causal = False
    if attention_mask is None:
        causal = site.kind == "decoder" and N > 1
        if causal and key.shape[2] > N:
            key, value, position_bias = key[:, :, :N], value[:, :, :N], position_bias[..., :N]
    elif attention_mask.dtype != torch.bool:
        raise TypeError(
            f"fastprefix: {type(module).__name__} (layer {module.layer_idx}) received a {attention_mask.dtype} "
            f"attention mask of shape {list(attention_mask.shape)}; a patched model takes a 2-D padding mask "
            "(1 = token, 0 = padding) or a bool 4-D mask over the sequence keys (True = attend)."
        )
    bias = None if site.kind == "cross" else extended_bias(site, position_bias, P, fastprefix_past, query)
    out = prefix_attention(query, key, value, prefix_k, prefix_v, causal=causal, scale=scaling,
                           attn_mask=attention_mask, attn_bias=bias, dropout_p=dropout, backend=site.state.backend)
    return out.transpose(1, 2), None


class RecordsPast(Swapped):
    """T5 self-attention of a patched model: hands its attention function `past`, how many tokens the cache
    held before this call, as T5 computes it (`cache.get_seq_length(layer)`, 0 without a cache), with the
    call's own arguments (so calls from several threads cannot mix)."""

    def forward(self, *args, **kwargs):
        cache = passed_cache(kwargs)
        past = 0 if cache is None else cache.get_seq_length(self.layer_idx)
        # A static cache counts in a tensor that its update increments in place (T5 clones it too).
        kwargs["fastprefix_past"] = past.clone() if isinstance(past, torch.Tensor) else past
        return super().forward(*args, **kwargs)


def install(model: nn.Module, state: PatchState) -> list[SwappedClass]:
    return [swap_class(module, RecordsPast, state) for kind in ("decoder", "encoder")
            for module in state.modules.get(kind, ())]


def prompt_kv(model: nn.Module, input_ids: torch.Tensor):
    """A prompt's keys and values make no prefix for an encoder-decoder model: refused with what to use."""
    raise TypeError(
        f"Prefix.from_prompt: {type(model).__name__} is an encoder-decoder model, and a prompt's keys and "
        "values make a prefix for decoder-only models (LLaMA, Mistral, Qwen2). For T5, pass "
        "fastprefix.patch a dict {kind: Prefix} of 'encoder', 'decoder', 'cross' prefixes, or train one "
        "with fastprefix.TrainablePrefix."
    )


FAMILY = Family(
    name="T5",
    model_types=("t5", "mt5"),
    kinds=KINDS,
    geometry=geometry,
    attention_modules=attention_modules,
    attention=attention,
    install=install,
    prompt_kv=prompt_kv,
)
