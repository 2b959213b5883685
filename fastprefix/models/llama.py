"""LLaMA and the models that share its attention (Mistral, Qwen2).

Their attention module projects q, k, v, rotates q and k by the position embeddings that the base model
computed once per forward (`model.base_model.rotary_emb`), updates the cache with the sequence keys, then
hands q, k, v and the mask to the function that `config._attn_implementation` names in transformers'
`AttentionInterface`. fastprefix changes two things and copies no forward:

* the attention function (see `attention`) adds the layer's prefix through `prefix_attention`; the cache
  update before it sees sequence keys only, so no cache ever holds the prefix;
* the rotary embedding (given the class `ShiftedRotary` while patched) shifts every position by P, so
  sequence tokens sit at P, P + 1, ... whatever the caller passed or `generate` computed (positions from the
  attention mask under left padding, the cache length while decoding); with bank rows, each row by its
  entry's P; with levels, by their total length (each row's own when the last level is bank rows). Prefix keys
  are stored already rotated, so they are not touched. The positions used to build the attention mask are left
  alone: the mask covers sequence keys.

Sliding windows (Mistral, Qwen2's sliding layers): a prompt's prefix (`Prefix.from_prompt`) sits at positions
0 .. P - 1 and leaves the window as the prompt does in plain transformers, by a bias of -inf on the prefix
columns a query no longer sees; a learned prefix (PEFT's, `TrainablePrefix`) is always visible, as in PEFT.
"""

from __future__ import annotations

import torch
from torch import nn

from ..compat import cache_of
from ..ops import bank_prefix_attention, levels_prefix_attention, prefix_attention
from .base import Family, Geometry, PatchState, Swapped, SwappedClass, swap_class


def geometry(model: nn.Module) -> dict[str, Geometry]:
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return {"decoder": Geometry(num_layers=config.num_hidden_layers, num_kv_heads=kv_heads, head_dim=head_dim)}


def attention_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    return {"decoder": [layer.self_attn for layer in model.base_model.layers]}


def attention(module, query, key, value, attention_mask, prefix_k, prefix_v, *, site, scaling, dropout=0.0,
              is_causal=None, prefix_index=None, prefix_levels=None, **kwargs):
    """transformers' `sdpa_attention_forward`, with the layer's prefix before the sequence keys, on the patch's
    backend (every layer is alike, so only the `site`'s patch state matters).

    The mask comes from `sdpa_mask` (patching registers it for fastprefix): a bool [B, 1, N, S] over the
    sequence keys (True = attend) carrying causality, padding and any sliding window, or None when
    attention is plain causal. transformers' SDPA reads None as `is_causal` when N > 1 (top-left aligned,
    which only differs from bottom-right when an empty static cache holds more slots than queries, and
    then crops keys to N) and as no mask when N == 1; so does this function. A learned prefix's columns are
    always visible, as in PEFT's attention mask, whose prefix entries are ones; under a sliding window
    (`sliding_window` among `kwargs`) a prompt's prefix leaves the window (`prompt_window_bias`). Other
    `kwargs` are already folded into the mask. With bank rows, `prefix_index` [B] is the entry each row reads
    and prefix_k, prefix_v hold one tensor per entry (`bank_prefix_attention`); with levels, `prefix_levels` holds
    them (`levels_prefix_attention`); no sliding window then.
    """
    causal = False
    if attention_mask is None:
        causal = bool(module.is_causal if is_causal is None else is_causal) and query.shape[2] > 1
        if causal and key.shape[2] > query.shape[2]:
            key, value = key[:, :, : query.shape[2]], value[:, :, : query.shape[2]]
    elif attention_mask.dtype != torch.bool:
        raise TypeError(
            f"fastprefix: layer {module.layer_idx} received a {attention_mask.dtype} attention mask of shape "
            f"{list(attention_mask.shape)}; a patched model takes a 2-D padding mask (1 = token, 0 = padding) or "
            "a bool 4-D mask over the sequence keys (True = attend)."
        )
    if prefix_levels is not None:
        if kwargs.get("sliding_window"):
            raise ValueError(
                f"fastprefix: layer {module.layer_idx} has a sliding window ({kwargs['sliding_window']}), which levels "
                "of prefixes do not support yet; use a model without sliding-window layers, or one Prefix of the "
                "whole prompt (Prefix.from_prompt(model, torch.cat([level-0 ids, level-1 ids])))."
            )
        out = levels_prefix_attention(query, key, value, prefix_levels, causal=causal, scale=scaling,
                                      attn_mask=attention_mask, dropout_p=dropout, backend=site.state.backend)
        return out.transpose(1, 2), None
    if prefix_index is not None:
        if kwargs.get("sliding_window"):
            raise ValueError(
                f"fastprefix: layer {module.layer_idx} has a sliding window ({kwargs['sliding_window']}), which bank "
                "rows (PrefixBank.rows) do not support yet; use a model without sliding-window layers, or patch with "
                "each entry's Prefix for the rows that read it."
            )
        out = bank_prefix_attention(query, key, value, prefix_k, prefix_v, prefix_index, causal=causal,
                                    scale=scaling, attn_mask=attention_mask, dropout_p=dropout,
                                    backend=site.state.backend)
        return out.transpose(1, 2), None
    bias = None
    prefix = site.state.prefixes.get(site.kind)
    if kwargs.get("sliding_window") and prefix is not None and prefix.prompt_ids is not None:
        bias = prompt_window_bias(kwargs["position_ids"], prefix.length, key.shape[2], kwargs["sliding_window"],
                                  query)
    out = prefix_attention(query, key, value, prefix_k, prefix_v, causal=causal, scale=scaling,
                           attn_mask=attention_mask, attn_bias=bias, dropout_p=dropout, backend=site.state.backend)
    return out.transpose(1, 2), None


def prompt_window_bias(position_ids: torch.Tensor, P: int, S: int, window: int, query: torch.Tensor):
    """[B or 1, 1, N, P + S] bias for a prompt's prefix under a sliding window, or None when every query sees
    all of it. Query i sits at position P + position_ids[..., i] (`position_ids` [B or 1, N]: sequence
    positions before the shift by P) and the prompt's token m at m; as in transformers' sliding-window mask,
    the query sees the token while their distance is below `window`: -inf where P + position - m >= window,
    0 elsewhere (the sequence columns, whose window is in the mask)."""
    hidden = position_ids[..., None] + (P - torch.arange(P, device=position_ids.device)) >= window
    if not hidden.any():
        return None
    bias = query.new_zeros(hidden.shape[0], 1, hidden.shape[1], P + S)
    bias[:, 0, :, :P].masked_fill_(hidden, float("-inf"))
    return bias


class ShiftedRotary(Swapped):
    """The rotary embedding of a patched model: every position it receives is shifted by P, the length of the
    patch's decoder prefix, or for bank rows each row's by its entry's P, for levels by their total length
    (`x` [B, N, hidden] gives the rows; Llama and Mistral pass `position_ids` by keyword, Qwen2 positionally)."""

    def forward(self, x, position_ids, *args, **kwargs):
        shift = self.patch_state.position_shift("decoder", x.shape[0])
        return super().forward(x, position_ids + shift, *args, **kwargs)


def install(model: nn.Module, state: PatchState) -> list[SwappedClass]:
    return [swap_class(model.base_model.rotary_emb, ShiftedRotary, state)]


@torch.no_grad()
def prompt_kv(model: nn.Module, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's keys (after the rotary embedding) and values of the prompt `input_ids` [1, P], run once
    at positions 0 .. P - 1, as [Hkv, P, D] tensors in the model's dtype (under autocast the cache holds
    keys and values of the autocast dtype, or keys in float32 where the rotary embedding promotes them)."""
    cache = cache_of(model.base_model(input_ids=input_ids.to(model.device), use_cache=True))
    keys = [layer.keys[0].to(model.dtype) for layer in cache.layers]
    if any(k.shape[-2] != input_ids.shape[1] for k in keys):
        raise ValueError(
            f"Prefix.from_prompt: the model's cache kept {keys[0].shape[-2]} of the prompt's {input_ids.shape[1]} "
            "positions (a sliding-window cache?); use a prompt no longer than the window."
        )
    return keys, [layer.values[0].to(model.dtype) for layer in cache.layers]


FAMILY = Family(
    name="LLaMA",
    model_types=("llama", "mistral", "qwen2"),
    kinds={"decoder": "self-attention"},
    geometry=geometry,
    attention_modules=attention_modules,
    attention=attention,
    install=install,
    prompt_kv=prompt_kv,
    reads_banks=True,
    reads_levels=True,
)
