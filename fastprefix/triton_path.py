"""The Triton path: one autograd.Function over the general fused kernels of `fastprefix.kernels`, and the
forward-only decode kernels for inference on a few queries per row. The dispatcher (`dispatch`) decides which
runs; both compute the same function (the decode result equals the general forward's within rounding).

Forward saves q, k, v, the prefix, the mask and bias, out and lse; backward recomputes probabilities in
the kernels (nothing of size N x (P + S) is stored). The dropout mask is regenerated in backward from the
seed drawn in forward (from torch's default generator, so `torch.manual_seed` makes it reproducible).
Triton is imported on the first call, not when fastprefix is imported.

A prefix bank read by row index (`bank_prefix_attention`) runs the same kernels reading, for row b, entry
index[b] of the bank in place (`kernels.BankTable`): `TritonBankAttention` and the decode kernels likewise.
"""

from __future__ import annotations

import torch

from .checks import Dims


def _dropout_seed(dropout_p: float) -> int:
    return int(torch.randint(2**31 - 1, ()).item()) if dropout_p > 0 else 0


class TritonPrefixAttention(torch.autograd.Function):
    """Autograd for the Triton path. Inputs after the tensors: attn_bias, attn_mask (or None), causal,
    scale, dropout_p."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, attn_bias, attn_mask, causal, scale, dropout_p):
        from fastprefix import kernels

        seed = _dropout_seed(dropout_p)
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
        needs = ctx.needs_input_grad
        dq, dk, dv, dpk, dpv, dbias = kernels.attention_backward(
            dout, q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, out, lse, causal=ctx.causal,
            scale=ctx.scale, dropout_p=ctx.dropout_p, seed=ctx.seed, sequence_grad=needs[1] or needs[2],
            prefix_grad=needs[3] or needs[4], bias_grad=needs[5])
        return dq, dk, dv, dpk, dpv, dbias, None, None, None, None


def triton_prefix_attention(q, k, v, prefix_k, prefix_v, dims: Dims, *, causal, scale, attn_mask, attn_bias,
                            dropout_p):
    """The general kernels on validated inputs, with autograd. Returns (out [B, Hq, N, D] in q.dtype,
    lse [B, Hq, N] float32)."""
    return TritonPrefixAttention.apply(q, k, v, prefix_k, prefix_v, attn_bias, attn_mask, causal, scale, dropout_p)


def triton_decode_attention(q, k, v, prefix_k, prefix_v, dims: Dims, *, causal, scale, attn_mask, attn_bias,
                            dropout_p):
    """The decode kernels on validated inputs that need no gradient and draw no dropout (`dropout_p` is 0).
    Returns (out, lse) as `triton_prefix_attention`."""
    from fastprefix import kernels

    return kernels.decode_forward(q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, causal=causal, scale=scale)


class TritonBankAttention(torch.autograd.Function):
    """Autograd for the Triton path over a prefix bank. Inputs: q, k, v, index, attn_mask (or None), causal,
    scale, dropout_p, then the T entries' keys, then their values ([Hkv, P_t, D] each)."""

    @staticmethod
    def forward(ctx, q, k, v, index, attn_mask, causal, scale, dropout_p, *entries):
        from fastprefix import kernels

        T = len(entries) // 2
        seed = _dropout_seed(dropout_p)
        out, lse = kernels.attention_forward(q, k, v, None, None, attn_mask, None, causal=causal, scale=scale,
                                             dropout_p=dropout_p, seed=seed,
                                             bank=kernels.BankTable.of(entries[:T], entries[T:], index))
        ctx.save_for_backward(q, k, v, index, attn_mask, out, lse, *entries)
        ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed = causal, scale, dropout_p, seed
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        from fastprefix import kernels

        q, k, v, index, attn_mask, out, lse, *entries = ctx.saved_tensors
        T = len(entries) // 2
        needs = ctx.needs_input_grad
        prefix_grad = any(needs[8:])
        dq, dk, dv, dpk, dpv, _ = kernels.attention_backward(
            dout, q, k, v, None, None, attn_mask, None, out, lse, causal=ctx.causal, scale=ctx.scale,
            dropout_p=ctx.dropout_p, seed=ctx.seed, sequence_grad=needs[1] or needs[2], prefix_grad=prefix_grad,
            bias_grad=False, bank=kernels.BankTable.of(entries[:T], entries[T:], index))
        return dq, dk, dv, None, None, None, None, None, *(dpk + dpv if prefix_grad else [None] * len(entries))


def triton_bank_attention(q, k, v, bank_k, bank_v, index, dims: Dims, *, causal, scale, attn_mask, dropout_p):
    """The general kernels reading a prefix bank by row index, with autograd (each entry's gradient summed over
    its rows, deterministically). Inputs validated by `check_bank_inputs`; returns (out, lse) as
    `triton_prefix_attention`."""
    return TritonBankAttention.apply(q, k, v, index, attn_mask, causal, scale, dropout_p, *bank_k, *bank_v)


def triton_bank_decode(q, k, v, bank_k, bank_v, index, dims: Dims, *, causal, scale, attn_mask, dropout_p):
    """The decode kernels reading a prefix bank by row index (no gradient, `dropout_p` 0): the rows of each entry
    stacked against it, so an entry is read once per tile of its rows, not once per row."""
    from fastprefix import kernels

    return kernels.decode_forward(q, k, v, None, None, attn_mask, None, causal=causal, scale=scale,
                                  bank=kernels.BankTable.of(bank_k, bank_v, index))
