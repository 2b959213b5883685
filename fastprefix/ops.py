"""`prefix_attention`: the public op. Checks arguments, lets the dispatcher pick an implementation, returns out
(and lse). `bank_prefix_attention`: its variant for a prefix bank read by row index (Triton or torch path);
`levels_prefix_attention`: for several levels of prefixes in a row (cascade prompts; the torch path only)."""

from __future__ import annotations

import dataclasses

import torch

from .checks import check_bank_inputs, check_inputs, check_levels_inputs
from .dispatch import Call, check_bank_backend, check_levels_backend, select, select_bank
from .level_attention import torch_levels_attention

_AUTOCAST_FROM = (torch.float32, torch.float16, torch.bfloat16)


def _autocast_cast(device_type: str):
    """What autocast for `device_type` does to an argument: floating tensors of `_AUTOCAST_FROM` to its dtype."""
    dtype = torch.get_autocast_dtype(device_type)
    return lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_FROM else t


def prefix_attention(q, k, v, prefix_k, prefix_v, *, causal=False, scale=None, attn_mask=None, attn_bias=None,
                     dropout_p=0.0, return_lse=False, backend="auto"):
    """Attention of q over the keys [prefix ; sequence] without concatenating them.

    Args:
        q: [B, Hq, N, D] queries, any strides.
        k, v: [B, Hkv, S, D] sequence keys and values; Hq % Hkv == 0 (query head h reads KV head
            h // (Hq // Hkv): MHA, GQA and MQA).
        prefix_k, prefix_v: [Hkv, P, D] shared by every row, or [B, Hkv, P, D] one per row. P may be 0.
            Prefix columns are always visible (no causal or attn_mask applies to them).
        causal: query i (of N) sees sequence key j iff j <= i + (S - N), bottom-right aligned as in
            FlashAttention. For N = 2, S = 5 (1 = visible, prefix columns not drawn)::

                1 1 1 1 0
                1 1 1 1 1

        scale: score scale; default D ** -0.5 (T5 uses 1.0).
        attn_mask: bool, broadcastable to [B, Hq, N, S]; True = may attend. Sequence keys only.
        attn_bias: float (dtype of q), broadcastable to [B, Hq, N, P + S]; added to the scores of prefix
            and sequence columns (T5's relative position bias). Gradients flow to it.
        dropout_p: dropout on the attention probabilities of all P + S columns (a fresh mask per call).
        return_lse: also return the natural-log log-sum-exp of the scores, [B, Hq, N] float32 (no gradient).
        backend: "auto", "triton", "torch" or "reference" (the float32 materializing oracle); see
            `fastprefix.dispatch` for what each implementation takes.

    Returns:
        out [B, Hq, N, D] in q.dtype, and lse if `return_lse`. A row that sees no key gets out = 0 and
        lse = -inf.

    Under `torch.autocast` for q's device, like `scaled_dot_product_attention`: q, k, v, the prefix and
    attn_bias are cast to the autocast dtype (float64 is left alone) and the result is in that dtype;
    gradients reach the tensors as given.
    """
    if isinstance(q, torch.Tensor) and torch.is_autocast_enabled(q.device.type):
        cast = _autocast_cast(q.device.type)
        with torch.autocast(q.device.type, enabled=False):
            return prefix_attention(cast(q), cast(k), cast(v), cast(prefix_k), cast(prefix_v), causal=causal,
                                    scale=scale, attn_mask=attn_mask, attn_bias=cast(attn_bias),
                                    dropout_p=dropout_p, return_lse=return_lse, backend=backend)
    for name, flag in (("causal", causal), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"prefix_attention: `{name}` must be a bool, got {type(flag).__name__}.")
    if not isinstance(backend, str):
        raise TypeError(f"prefix_attention: `backend` must be a str, got {type(backend).__name__}.")
    dims, scale = check_inputs(q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, dropout_p, scale)
    implementation = select(backend, Call.of(q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, dims, dropout_p))
    out, lse = implementation.run(q, k, v, prefix_k, prefix_v, dims, causal=causal, scale=scale, attn_mask=attn_mask,
                                  attn_bias=attn_bias, dropout_p=dropout_p)
    return (out, lse.float()) if return_lse else out


def bank_prefix_attention(q, k, v, bank_k, bank_v, index, *, causal=False, scale=None, attn_mask=None, dropout_p=0.0,
                          return_lse=False, backend="auto"):
    """Attention of q over [entry index[b] of a prefix bank ; sequence keys of row b], without gathering the
    entries per row.

    Args as `prefix_attention`, but:
        bank_k, bank_v: lists of T tensors [Hkv, P_t, D], one per bank entry (P may differ between entries).
        index: [B] int32/int64 on q's device, values in [0, T): the entry each row reads.
        backend: "auto", "triton" or "torch"; "auto" picks as for one shared prefix (see `dispatch.select_bank`).
    No attn_bias. Gradients reach q, k, v and every entry (an entry's gradient summed over the rows reading it,
    zero for entries no row reads). Returns out [B, Hq, N, D] in q.dtype (and lse [B, Hq, N] in float32).
    Under autocast, inputs are cast as in `prefix_attention`.
    """
    check_bank_backend(backend, "bank_prefix_attention")
    if isinstance(q, torch.Tensor) and torch.is_autocast_enabled(q.device.type):
        cast = _autocast_cast(q.device.type)
        with torch.autocast(q.device.type, enabled=False):
            return bank_prefix_attention(cast(q), cast(k), cast(v), [cast(t) for t in bank_k],
                                         [cast(t) for t in bank_v], index, causal=causal, scale=scale,
                                         attn_mask=attn_mask, dropout_p=dropout_p, return_lse=return_lse,
                                         backend=backend)
    for name, flag in (("causal", causal), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"bank_prefix_attention: `{name}` must be a bool, got {type(flag).__name__}.")
    dims, scale = check_bank_inputs(q, k, v, bank_k, bank_v, index, attn_mask, dropout_p, scale)
    call = Call.of(q, k, v, bank_k[0], bank_v[0], attn_mask, None, dims, dropout_p)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *bank_k, *bank_v))
    run = select_bank(backend, dataclasses.replace(call, needs_grad=needs_grad, features=call.features | {"bank"}))
    out, lse = run(q, k, v, tuple(bank_k), tuple(bank_v), index, dims, causal=causal, scale=scale, attn_mask=attn_mask,
                   dropout_p=dropout_p)
    return (out, lse.float()) if return_lse else out


def levels_prefix_attention(q, k, v, levels, *, causal=False, scale=None, attn_mask=None, dropout_p=0.0,
                            return_lse=False, backend="auto"):
    """Attention of q over [level 0 ; level 1 ; ... ; sequence keys] (cascade prompts), without concatenating them
    or copying any level per row.

    Args as `prefix_attention`, but:
        levels: a non-empty list, in order, of shared levels (prefix_k, prefix_v), [Hkv, P_i, D] tensors read by
            every row, and bank levels (bank_k, bank_v, index) as in `bank_prefix_attention`, row b reading entry
            index[b]. Level columns are always visible. The segments merge by log-sum-exp (docs/design.md).
        backend: "auto" or "torch" (the fused PyTorch path; the Triton kernels do not read levels).
    No attn_bias. Gradients reach q, k, v and every level's tensors (a shared level's summed over the rows, a bank
    entry's over the rows reading it). Returns out [B, Hq, N, D] in q.dtype (and lse [B, Hq, N] in float32).
    Under autocast, inputs are cast as in `prefix_attention`.
    """
    check_levels_backend(backend, "levels_prefix_attention")
    if isinstance(q, torch.Tensor) and torch.is_autocast_enabled(q.device.type):
        cast = _autocast_cast(q.device.type)
        cast_level = lambda level: ((cast(level[0]), cast(level[1])) if len(level) == 2 else
                                    ([cast(t) for t in level[0]], [cast(t) for t in level[1]], level[2]))
        with torch.autocast(q.device.type, enabled=False):
            return levels_prefix_attention(cast(q), cast(k), cast(v), [cast_level(level) for level in levels],
                                           causal=causal, scale=scale, attn_mask=attn_mask, dropout_p=dropout_p,
                                           return_lse=return_lse, backend=backend)
    for name, flag in (("causal", causal), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"levels_prefix_attention: `{name}` must be a bool, got {type(flag).__name__}.")
    dims, scale = check_levels_inputs(q, k, v, levels, attn_mask, dropout_p, scale)
    levels = [tuple(level) if len(level) == 2 else (tuple(level[0]), tuple(level[1]), level[2]) for level in levels]
    out, lse = torch_levels_attention(q, k, v, levels, dims, causal=causal, scale=scale, attn_mask=attn_mask,
                                      dropout_p=dropout_p)
    return (out, lse.float()) if return_lse else out
