"""The Triton path: the decode kernels for inference on a few queries, else one autograd.Function over the
general fused kernels of `fastprefix.kernels`.

Dispatch (`decode_reasons`): a call runs the decode kernels (`kernels.decode_forward`: the shared prefix
read once per tile of stacked queries, split-KV over each row's cache) when it has at most
`kernels.DECODE_MAX_N` queries per row, needs no gradient (grad mode off, or no input requiring grad), has
no dropout and a head dim of at most `kernels.DECODE_MAX_HEAD_DIM`. Anything else runs the general kernels,
which support every feature and backward; a call that needs gradients therefore never reaches the
forward-only decode kernels. Both compute the same function (the decode result equals the general
forward's within rounding).

Forward saves q, k, v, the prefix, the mask and bias, out and lse; backward recomputes probabilities in
the kernels (nothing of size N x (P + S) is stored). The dropout mask is regenerated in backward from the
seed drawn in forward (from torch's default generator, so `torch.manual_seed` makes it reproducible).
Triton is imported on the first call, not when fastprefix is imported.
"""

from __future__ import annotations

import torch

from .checks import Dims

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def input_reasons(dims: Dims, dtype: torch.dtype) -> list[str]:
    """Why the Triton kernels cannot take inputs of this dtype and these sizes; empty when they can."""
    reasons = []
    if dtype not in DTYPES:
        reasons.append(f"`q` must be float16, bfloat16 or float32 for the Triton kernels, got {dtype}; "
                       "use backend='torch' for float64")
    if dims.D > MAX_HEAD_DIM:
        reasons.append(f"`q` has head dim D = {dims.D}, the Triton kernels take D <= {MAX_HEAD_DIM}; "
                       "use backend='torch' for larger heads")
    return reasons


class TritonPrefixAttention(torch.autograd.Function):
    """Autograd for the Triton path. Inputs after the tensors: attn_bias, attn_mask (or None), causal,
    scale, dropout_p."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, attn_bias, attn_mask, causal, scale, dropout_p):
        from fastprefix import kernels

        seed = int(torch.randint(2**31 - 1, ()).item()) if dropout_p > 0 else 0
        out, lse = kernels.attention_forward(q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, causal=causal,
                                             scale=scale, dropout_p=dropout_p, seed=seed)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, attn_bias, attn_mask, out, lse)
        ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed = causal, scale, dropout_p, seed
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        from fastprefix import kernels

        q, k, v, prefix_k, prefix_v, attn_bias, attn_mask, out, lse = ctx.saved_tensors
        dq, dk, dv, dpk, dpv, dbias = kernels.attention_backward(
            dout, q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, out, lse, causal=ctx.causal,
            scale=ctx.scale, dropout_p=ctx.dropout_p, seed=ctx.seed, bias_grad=ctx.needs_input_grad[5])
        return dq, dk, dv, dpk, dpv, dbias, None, None, None, None


def decode_reasons(dims: Dims, *, dropout_p: float, needs_grad: bool) -> list[str]:
    """Why a Triton call runs the general kernels rather than the decode kernels; empty when it runs the
    decode kernels."""
    from fastprefix import kernels

    reasons = []
    if dims.N > kernels.DECODE_MAX_N:
        reasons.append(f"N = {dims.N} queries per row, the decode kernels take N <= {kernels.DECODE_MAX_N}")
    if needs_grad:
        reasons.append("gradients are needed and the decode kernels are forward-only")
    if dropout_p > 0:
        reasons.append(f"dropout_p = {dropout_p}, the decode kernels have no dropout")
    if dims.D > kernels.DECODE_MAX_HEAD_DIM:
        reasons.append(f"head dim D = {dims.D}, the decode kernels take D <= {kernels.DECODE_MAX_HEAD_DIM}")
    return reasons


def triton_prefix_attention(q, k, v, prefix_k, prefix_v, dims: Dims, *, causal, scale, attn_mask, attn_bias,
                            dropout_p):
    """The Triton path on validated inputs. Returns (out [B, Hq, N, D] in q.dtype, lse [B, Hq, N] float32)."""
    reasons = input_reasons(dims, q.dtype)
    if reasons:
        raise ValueError("prefix_attention: backend 'triton' cannot take these inputs: " + "; ".join(reasons) + ".")
    inputs = (q, k, v, prefix_k, prefix_v, attn_bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    if not decode_reasons(dims, dropout_p=dropout_p, needs_grad=needs_grad):
        from fastprefix import kernels

        return kernels.decode_forward(q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, causal=causal, scale=scale)
    return TritonPrefixAttention.apply(q, k, v, prefix_k, prefix_v, attn_bias, attn_mask, causal, scale, dropout_p)
