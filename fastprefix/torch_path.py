"""The fused PyTorch path: prefix and sequence attended as two segments, merged by log-sum-exp.

Nothing is concatenated and a shared prefix is never expanded over the batch. For a shared prefix
[Hkv, P, D] the queries of all B rows and all G query heads of a KV group are stacked into one
[1, Hkv, B*G*N, D] tensor, so the prefix part of the whole batch is one batched matrix product per KV head
and the prefix gradient comes out already summed over rows and heads. Backward recomputes each segment
from q, k, v, prefix, the merged output and the merged log-sum-exp; nothing of size N x S is saved.

Segment results are merged in a 5-D view [B, Hkv, G, N, X] that both layouts reach without copying,
accumulating into the sequence segment's own output buffer. Each segment runs on an engine of
`segment_attention` (FlashCPU or Explicit), chosen by the dispatcher.
"""

from __future__ import annotations

import torch

from .checks import Dims
from .segment_attention import NEG_INF


def merge_lse(parts):
    """Merge normalized segment outputs by their log-sum-exps; consumes `parts`.

    parts: non-empty list of (out [..., N, D], lse [..., N]), all broadcast-compatible. Returns (out, lse)
    with lse = logsumexp_i(lse_i) and out = sum_i exp(lse_i - lse) * out_i, accumulated in lse's dtype
    in the first part's buffer when it has that dtype. Rows where every lse_i is -inf get out = 0 and
    lse = -inf.
    """
    lse = parts[0][1]
    for _, lse_i in parts[1:]:
        lse = torch.logaddexp(lse, lse_i)
    finite = lse.masked_fill(torch.isneginf(lse), 0.0)
    out = None
    for out_i, lse_i in parts:
        weight = torch.exp(lse_i - finite)[..., None]
        out = out_i.to(lse.dtype).mul_(weight) if out is None else out.addcmul_(out_i, weight)
    return out, lse


def to_prefix_layout(t: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, N, X] -> [1, Hkv, B*G*N, X] (a copy): every query row that reads KV head h, stacked."""
    B, Hq, N, X = t.shape
    return t.unflatten(1, (hkv, Hq // hkv)).transpose(0, 1).reshape(1, hkv, -1, X)


def _grouped(t: torch.Tensor, dims: Dims) -> torch.Tensor:
    """A view [B, Hkv, G, N, X] of a [B, Hq, N, X] tensor."""
    return t.unflatten(1, (dims.Hkv, dims.G))


def _grouped_prefix_result(t: torch.Tensor, dims: Dims) -> torch.Tensor:
    """A view [B, Hkv, G, N, X] of a prefix-segment result ([1, Hkv, B*G*N, X] when shared)."""
    if dims.shared:
        return t.view(dims.Hkv, dims.B, dims.G, dims.N, t.shape[-1]).transpose(0, 1)
    return _grouped(t, dims)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def segment_masks(dims: Dims, causal, attn_mask, attn_bias, device):
    """Bias and hidden-key masks of the two segments.

    Returns (prefix_bias, seq_bias, seq_hidden, square_causal): prefix_bias is in the layout the prefix
    segment runs in; seq_bias (float) and seq_hidden (bool, True = hidden) are 4-D and broadcastable to
    [B, Hq, N, S]; each is None when absent. A bottom-right causal mask is passed on as `square_causal` when
    N == S (the kernels skip the hidden blocks) and folded into seq_hidden otherwise.
    """
    P = dims.P
    prefix_bias = seq_bias = None
    if attn_bias is not None:
        attn_bias = _as_4d(attn_bias)
        prefix_bias, seq_bias = attn_bias[..., :P], attn_bias[..., P:]
        if dims.shared and P:
            prefix_bias = to_prefix_layout(prefix_bias.expand(dims.B, dims.Hq, dims.N, P), dims.Hkv)
    hidden = None if attn_mask is None else ~_as_4d(attn_mask)
    square_causal = causal and dims.N == dims.S
    if causal and not square_causal and dims.N > 1:
        # bottom-right aligned: query i hides sequence key j iff j > i + (S - N)
        above = torch.ones(dims.N, dims.S, dtype=torch.bool, device=device).triu(dims.S - dims.N + 1)[None, None]
        hidden = above if hidden is None else hidden | above
    return prefix_bias, seq_bias, hidden, square_causal


def _prefix_operands(q, prefix_k, prefix_v, dims: Dims):
    """q, k, v of the prefix segment: stacked rows against [1, Hkv, P, D] when shared."""
    if dims.shared:
        return to_prefix_layout(q, dims.Hkv), prefix_k[None], prefix_v[None]
    return q, prefix_k, prefix_v


def _prefix_of(t: torch.Tensor, dims: Dims) -> torch.Tensor:
    return to_prefix_layout(t, dims.Hkv) if dims.shared else t


class TorchPrefixAttention(torch.autograd.Function):
    """Autograd for the fused PyTorch path. Saves inputs, out and lse only."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, prefix_bias, seq_bias, seq_hidden, square_causal, dims, scale,
                dropout_p, engine):
        seed = int(torch.randint(2**62, ()).item()) if dropout_p > 0 else 0
        parts = []
        if dims.P:  # first, so its stacked copy of q is freed before the sequence segment allocates
            out_p, lse_p = engine.forward(*_prefix_operands(q, prefix_k, prefix_v, dims), prefix_bias, None,
                                          False, scale, dropout_p, seed)
            parts.append((_grouped_prefix_result(out_p, dims), _grouped_prefix_result(lse_p[..., None], dims)[..., 0]))
        if dims.S:  # merged into first: its output buffer has q's layout and becomes `out`
            out_s, lse_s = engine.forward(q, k, v, seq_bias, seq_hidden, square_causal, scale, dropout_p,
                                          seed + 1)
            parts.insert(0, (_grouped(out_s, dims), _grouped(lse_s[..., None], dims)[..., 0]))
        if parts:
            out, lse = merge_lse(parts)
            out, lse = out.reshape(q.shape).to(q.dtype), lse.reshape(q.shape[:-1])
        else:
            out, lse = torch.zeros_like(q), q.new_full(q.shape[:-1], NEG_INF, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_bias, seq_bias, seq_hidden, out, lse)
        ctx.engine, ctx.dims, ctx.square_causal, ctx.scale = engine, dims, square_causal, scale
        ctx.dropout_p, ctx.seed = dropout_p, seed
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, prefix_k, prefix_v, prefix_bias, seq_bias, seq_hidden, out, lse = ctx.saved_tensors
        dims, engine, options = ctx.dims, ctx.engine, (ctx.scale, ctx.dropout_p)
        # Rows that see no key: L = +inf makes every probability exp(s - L) zero in backward.
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
        dout = dout.to(q.dtype)
        dq = dqp = dprefix_bias = dseq_bias = None
        if dims.P:
            dqp, dpk, dpv, dprefix_bias = engine.backward(
                _prefix_of(dout, dims), *_prefix_operands(q, prefix_k, prefix_v, dims), _prefix_of(out, dims),
                _prefix_of(lse[..., None], dims)[..., 0], prefix_bias, None, False, *options, ctx.seed)
            dpk, dpv = dpk.reshape(prefix_k.shape), dpv.reshape(prefix_v.shape)
        else:  # empty tensors
            dpk, dpv = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
        if dims.S:
            dq, dk, dv, dseq_bias = engine.backward(
                dout, q, k, v, out, lse, seq_bias, seq_hidden, ctx.square_causal, *options, ctx.seed + 1)
        else:  # empty tensors
            dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        if dqp is not None:
            dqp = _grouped_prefix_result(dqp, dims)
            dq = dqp.reshape(q.shape) if dq is None else _grouped(dq, dims).add_(dqp).flatten(1, 2)
        elif dq is None:
            dq = torch.zeros_like(q)
        grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpk.to(q.dtype), dpv.to(q.dtype))
        return (*grads, dprefix_bias, dseq_bias, None, None, None, None, None, None)


def torch_prefix_attention(q, k, v, prefix_k, prefix_v, dims: Dims, *, engine, causal, scale, attn_mask, attn_bias,
                           dropout_p):
    """The fused PyTorch path on validated inputs, each segment computed by `engine` (FlashCPU or Explicit).
    Returns (out [B, Hq, N, D] in q.dtype, lse [B, Hq, N])."""
    masks = segment_masks(dims, causal, attn_mask, attn_bias, q.device)
    return TorchPrefixAttention.apply(q, k, v, prefix_k, prefix_v, *masks, dims, scale, dropout_p, engine)
