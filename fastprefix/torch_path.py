"""The fused PyTorch path: prefix and sequence attended as two segments, merged by log-sum-exp.

Nothing is concatenated and a shared prefix is never expanded over the batch. For a shared prefix
[Hkv, P, D] the queries of all B rows and all G query heads of a KV group are stacked into one
[1, Hkv, B*G*N, D] tensor, so the prefix part of the whole batch is one batched matrix product per KV head
and the prefix gradient comes out already summed over rows and heads. Backward recomputes each segment
from q, k, v, prefix, the merged output and the merged log-sum-exp; nothing of size N x S is saved.
"""

from __future__ import annotations

import torch

from .checks import Dims
from .reference import causal_visibility
from .segment_attention import NEG_INF, Explicit, FlashCPU


def merge_lse(parts, like: torch.Tensor):
    """Merge normalized segment outputs by their log-sum-exps.

    parts: list of (out [..., N, D], lse [..., N]); `like` gives the shape and device when `parts` is empty.
    Returns (out in float32/float64, lse) with out = sum_i exp(lse_i - lse) * out_i and
    lse = logsumexp_i(lse_i). Rows where every lse_i is -inf get out = 0 and lse = -inf.
    """
    if not parts:
        ct = torch.float64 if like.dtype == torch.float64 else torch.float32
        return torch.zeros(like.shape, dtype=ct, device=like.device), like.new_full(like.shape[:-1], NEG_INF, dtype=ct)
    lse = parts[0][1]
    for _, lse_i in parts[1:]:
        lse = torch.logaddexp(lse, lse_i)
    finite = lse.masked_fill(torch.isneginf(lse), 0.0)
    out = sum(torch.exp(lse_i - finite)[..., None] * out_i.to(lse.dtype) for out_i, lse_i in parts)
    return out, lse


def to_prefix_layout(t: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, N, X] -> [1, Hkv, B*G*N, X]: every query row that reads KV head h, stacked."""
    B, Hq, N, X = t.shape
    return t.unflatten(1, (hkv, Hq // hkv)).transpose(0, 1).reshape(1, hkv, -1, X)


def from_prefix_layout(t: torch.Tensor, B: int, Hq: int) -> torch.Tensor:
    """Inverse of `to_prefix_layout`: [1, Hkv, B*G*N, X] -> [B, Hq, N, X]."""
    _, hkv, rows, X = t.shape
    return t.reshape(hkv, B, Hq // hkv, rows // (B * Hq // hkv), X).transpose(0, 1).reshape(B, Hq, -1, X)


def segment_masks(dims: Dims, causal, attn_mask, attn_bias, dtype, device):
    """Additive float masks (0 = visible, -inf = hidden, plus bias) for the two segments.

    Returns (prefix_mask, sequence_mask, square_causal). prefix_mask is in the layout the prefix segment
    runs in; sequence_mask is 4-D and broadcastable to [B, Hq, N, S]. Either is None when it would be all
    zeros. A bottom-right causal mask is passed on as `square_causal` when N == S (the kernels skip the
    hidden blocks) and folded into sequence_mask otherwise.
    """
    P = dims.P
    prefix_mask = seq_mask = None
    if attn_bias is not None:
        attn_bias = _as_4d(attn_bias)
        prefix_mask, seq_mask = attn_bias[..., :P], attn_bias[..., P:]
        if dims.shared and P:
            prefix_mask = to_prefix_layout(prefix_mask.expand(dims.B, dims.Hq, dims.N, P), dims.Hkv)
    hidden = None if attn_mask is None else ~_as_4d(attn_mask)
    square_causal = causal and dims.N == dims.S
    if causal and not square_causal and dims.N > 1:
        above = ~causal_visibility(dims.N, dims.S, device)[None, None]
        hidden = above if hidden is None else hidden | above
    if hidden is not None:
        if seq_mask is None:
            seq_mask = torch.zeros((), dtype=dtype, device=device)
        seq_mask = seq_mask.masked_fill(hidden, NEG_INF)
    return prefix_mask, seq_mask, square_causal


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def _engine(q: torch.Tensor, dropout_p: float, *masks):
    """FlashCPU when it can do the job (CPU, no dropout, no mask gradient), else Explicit."""
    wants_mask_grad = any(m is not None and m.requires_grad for m in masks)
    if q.device.type == "cpu" and dropout_p == 0 and not wants_mask_grad:
        return FlashCPU
    return Explicit


def _prefix_operands(q, prefix_k, prefix_v, dims: Dims):
    """q, k, v of the prefix segment: stacked rows against [1, Hkv, P, D] when shared."""
    if dims.shared:
        return to_prefix_layout(q, dims.Hkv), prefix_k[None], prefix_v[None]
    return q, prefix_k, prefix_v


def _rows_of(t: torch.Tensor, dims: Dims) -> torch.Tensor:
    """A prefix-segment result [.., rows, X] back in the [B, Hq, N, X] layout."""
    return from_prefix_layout(t, dims.B, dims.Hq) if dims.shared else t


def _prefix_of(t: torch.Tensor, dims: Dims) -> torch.Tensor:
    return to_prefix_layout(t, dims.Hkv) if dims.shared else t


class TorchPrefixAttention(torch.autograd.Function):
    """Autograd for the fused PyTorch path. Saves inputs, out and lse only."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, prefix_mask, seq_mask, dims, square_causal, scale, dropout_p):
        engine = _engine(q, dropout_p, prefix_mask, seq_mask)
        seed = int(torch.randint(2**62, ()).item()) if dropout_p > 0 else 0
        parts = []
        if dims.P:
            qp, kp, vp = _prefix_operands(q, prefix_k, prefix_v, dims)
            out_p, lse_p = engine.forward(qp, kp, vp, prefix_mask, False, scale, dropout_p, seed)
            parts.append((_rows_of(out_p, dims), _rows_of(lse_p[..., None], dims)[..., 0]))
        if dims.S:
            parts.append(engine.forward(q, k, v, seq_mask, square_causal, scale, dropout_p, seed + 1))
        out, lse = merge_lse(parts, like=q)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_mask, seq_mask, out, lse)
        ctx.engine, ctx.dims, ctx.square_causal, ctx.scale = engine, dims, square_causal, scale
        ctx.dropout_p, ctx.seed = dropout_p, seed
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, prefix_k, prefix_v, prefix_mask, seq_mask, out, lse = ctx.saved_tensors
        dims, engine, args = ctx.dims, ctx.engine, (ctx.scale, ctx.dropout_p)
        # Rows that see no key: L = +inf makes every probability exp(s - L) zero in backward.
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
        dout = dout.to(q.dtype)
        dq = torch.zeros_like(q)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dpk, dpv = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
        dprefix_mask = dseq_mask = None
        if dims.P:
            qp, kp, vp = _prefix_operands(q, prefix_k, prefix_v, dims)
            dqp, dpk, dpv, dprefix_mask = engine.backward(
                _prefix_of(dout, dims), qp, kp, vp, _prefix_of(out, dims), _prefix_of(lse[..., None], dims)[..., 0],
                prefix_mask, False, *args, ctx.seed)
            dq = dq + _rows_of(dqp, dims)
            dpk, dpv = dpk.reshape(prefix_k.shape), dpv.reshape(prefix_v.shape)
        if dims.S:
            dqs, dk, dv, dseq_mask = engine.backward(
                dout, q, k, v, out, lse, seq_mask, ctx.square_causal, *args, ctx.seed + 1)
            dq = dq + dqs
        grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpk.to(q.dtype), dpv.to(q.dtype))
        return (*grads, dprefix_mask, dseq_mask, None, None, None, None)


def torch_prefix_attention(q, k, v, prefix_k, prefix_v, dims: Dims, *, causal, scale, attn_mask, attn_bias,
                           dropout_p):
    """The fused PyTorch path on validated inputs. Returns (out [B, Hq, N, D] in q.dtype, lse [B, Hq, N])."""
    prefix_mask, seq_mask, square_causal = segment_masks(dims, causal, attn_mask, attn_bias, q.dtype, q.device)
    return TorchPrefixAttention.apply(q, k, v, prefix_k, prefix_v, prefix_mask, seq_mask, dims, square_causal,
                                      scale, dropout_p)
