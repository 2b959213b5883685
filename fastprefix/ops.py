"""`prefix_attention`: the public op. Checks arguments, picks a backend, returns out (and lse)."""

from __future__ import annotations

import torch

from .backends import resolve_backend
from .checks import check_inputs
from .reference import reference_attention
from .torch_path import torch_prefix_attention
from .triton_path import input_reasons, triton_prefix_attention


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
        backend: "auto", "triton", "torch" or "reference" (the float32 materializing oracle).

    Returns:
        out [B, Hq, N, D] in q.dtype, and lse if `return_lse`. A row that sees no key gets out = 0 and
        lse = -inf.
    """
    for name, flag in (("causal", causal), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"prefix_attention: `{name}` must be a bool, got {type(flag).__name__}.")
    if not isinstance(backend, str):
        raise TypeError(f"prefix_attention: `backend` must be a str, got {type(backend).__name__}.")
    dims, scale = check_inputs(q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, dropout_p, scale)
    name = resolve_backend(backend, q.device, input_reasons(dims, q.dtype))
    options = dict(causal=causal, scale=scale, attn_mask=attn_mask, attn_bias=attn_bias, dropout_p=dropout_p)
    if name == "reference":
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        out, lse = reference_attention(q, k, v, prefix_k, prefix_v, compute_dtype=compute_dtype, **options)
        out = out.to(q.dtype)
    elif name == "triton":
        out, lse = triton_prefix_attention(q, k, v, prefix_k, prefix_v, dims, **options)
    else:
        out, lse = torch_prefix_attention(q, k, v, prefix_k, prefix_v, dims, **options)
    return (out, lse.float()) if return_lse else out
