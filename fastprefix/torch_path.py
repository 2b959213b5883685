"""The fused PyTorch path: prefix and sequence attended as two segments, merged by log-sum-exp.

Nothing is concatenated and a shared prefix [Hkv, P, D] is never copied per row. For each query head, the
query rows of all B batch rows are stacked into one [1, Hq, B*N, D] tensor, so the prefix part of the whole
batch is one segment call against [1, Hkv, P, D], forward and backward, whose prefix gradient comes out
summed over rows (and, in the engine, over the G query heads of each KV head). The stacked layout is a view
of any tensor whose storage is ordered [B, N, Hq, D]: what transformers' projections produce, and what the
CPU flash kernels then produce too. So q and, in backward, dout are brought to that order once (a copy only
for other layouts; the CPU flash backward would copy dout to it anyway), and out, lse and the stacked results
are views. Backward recomputes each segment from q, k, v, prefix, the merged output and the merged
log-sum-exp; nothing of size N x S is saved.

The merge is one pass over the output, in place in the sequence segment's output buffer (see `merge_lse`).
Each segment runs on an engine of `segment_attention` (FlashCPU or Explicit), chosen by the dispatcher.
"""

from __future__ import annotations

import torch

from .checks import Dims
from .segment_attention import NEG_INF


def merge_lse(parts):
    """Merge one or two normalized segment results by their log-sum-exps; overwrites the first output.

    parts: [(out [..., N, D], lse [..., N])] or two such pairs of one shape (a row that sees no key of its
    segment has out = 0 and lse = -inf). Returns (out, lse) with lse = logaddexp(lse_1, lse_2) and
    out = exp(lse_1 - lse) * out_1 + exp(lse_2 - lse) * out_2. The two weights sum to 1, so this is
    lerp(out_1, out_2, w) with w = exp(lse_2 - lse) = sigmoid(lse_2 - lse_1): one pass over the output, in
    out_1's buffer when out_1 has lse's dtype (in lse's dtype otherwise). Rows where both lse are -inf get
    out = 0 and lse = -inf. One part is returned as it is.
    """
    if len(parts) == 1:
        return parts[0]
    (out, lse_1), (out_2, lse_2) = parts
    weight = torch.sigmoid(lse_2 - lse_1).nan_to_num_(0.0)  # NaN: both -inf, and then out_1 = out_2 = 0
    if out.dtype != lse_1.dtype:
        out, out_2 = out.to(lse_1.dtype), out_2.to(lse_1.dtype)
    return out.lerp_(out_2, weight.unsqueeze(-1)), torch.logaddexp(lse_1, lse_2)


def _stacked(t: torch.Tensor, dims: Dims) -> torch.Tensor:
    """[B, Hq, N, ...] -> [1, Hq, B*N, ...]: the query rows of every batch row, per query head. A view when
    t's storage is ordered [B, N, Hq, ...], a copy otherwise."""
    return t.transpose(0, 1).reshape(1, dims.Hq, dims.B * dims.N, *t.shape[3:])


def _unstacked(t: torch.Tensor, dims: Dims) -> torch.Tensor:
    """The view [B, Hq, N, ...] of a stacked [1, Hq, B*N, ...] tensor."""
    return t[0].unflatten(1, (dims.B, dims.N)).transpose(0, 1)


def _stacked_bias(bias, dims: Dims):
    """A prefix bias broadcastable to [B, Hq, N, P] in the stacked layout [1, Hq, B*N, P] (None stays None)."""
    return None if bias is None else _stacked(bias.expand(dims.B, dims.Hq, dims.N, dims.P), dims)


def _heads_inner(t: torch.Tensor) -> torch.Tensor:
    """t [B, H, N, X] with its storage ordered [B, N, H, X]: t itself when it is, else a copy."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def segment_masks(dims: Dims, causal, attn_mask, attn_bias, device):
    """Bias and hidden-key masks of the two segments.

    Returns (prefix_bias, seq_bias, seq_hidden, square_causal): prefix_bias (float) is 4-D and broadcastable
    to [B, Hq, N, P], seq_bias (float) and seq_hidden (bool, True = hidden) to [B, Hq, N, S], all views of
    the caller's tensors but seq_hidden; each is None when absent. A bottom-right causal mask is passed on as
    `square_causal` when N == S (the kernels apply it without a mask tensor) and folded into seq_hidden otherwise.
    """
    P = dims.P
    prefix_bias = seq_bias = None
    if attn_bias is not None:
        attn_bias = _as_4d(attn_bias)
        prefix_bias, seq_bias = attn_bias[..., :P], attn_bias[..., P:]
    hidden = None if attn_mask is None else ~_as_4d(attn_mask)
    square_causal = causal and dims.N == dims.S
    if causal and not square_causal and dims.N > 1:
        # bottom-right aligned: query i hides sequence key j iff j > i + (S - N)
        above = torch.ones(dims.N, dims.S, dtype=torch.bool, device=device).triu(dims.S - dims.N + 1)[None, None]
        hidden = above if hidden is None else hidden | above
    return prefix_bias, seq_bias, hidden, square_causal


def _prefix_forward(q, prefix_k, prefix_v, bias, dims: Dims, engine, options):
    """(out [B, Hq, N, D], lse [B, Hq, N]) of the prefix segment; for a shared prefix one call on the stacked
    rows (a view of q, whose storage is ordered [B, N, Hq, D])."""
    if not dims.shared:
        return engine.forward(q, prefix_k, prefix_v, bias, None, False, *options)
    out, lse = engine.forward(_stacked(q, dims), prefix_k[None], prefix_v[None], _stacked_bias(bias, dims), None,
                              False, *options)
    return _unstacked(out, dims), _unstacked(lse, dims)


def _prefix_backward(dout, q, out, lse, prefix_k, prefix_v, bias, dims: Dims, engine, options):
    """(dq, dprefix_k, dprefix_v, dbias) of the prefix segment; for a shared prefix one call on the stacked
    rows, whose prefix gradient is summed over them. dbias (None unless the engine computes one) has the
    shape of `bias`."""
    if not dims.shared:
        return engine.backward(dout, q, prefix_k, prefix_v, out, lse, bias, None, False, *options)
    dq, dpk, dpv, dbias = engine.backward(_stacked(dout, dims), _stacked(q, dims), prefix_k[None], prefix_v[None],
                                          _stacked(out, dims), _stacked(lse, dims), _stacked_bias(bias, dims), None,
                                          False, *options)
    if dbias is not None:
        dbias = _unstacked(dbias, dims).sum_to_size(bias.shape)
    return _unstacked(dq, dims), dpk[0], dpv[0], dbias


def _attend(q, k, v, prefix_k, prefix_v, masks, dims: Dims, scale, dropout_p, engine, seed):
    """(out [B, Hq, N, D] in q.dtype, lse [B, Hq, N] in the engine's accumulation dtype) of both segments,
    merged; `masks` as `segment_masks` returns them. The output has the layout of the sequence segment's."""
    prefix_bias, seq_bias, seq_hidden, square_causal = masks
    parts = []
    if dims.S:  # first: the merge overwrites its output buffer, which becomes `out`
        parts.append(engine.forward(q, k, v, seq_bias, seq_hidden, square_causal, scale, dropout_p, seed + 1))
    if dims.P:
        parts.append(_prefix_forward(q, prefix_k, prefix_v, prefix_bias, dims, engine, (scale, dropout_p, seed)))
    if not parts:
        return torch.zeros_like(q), q.new_full(q.shape[:-1], NEG_INF, dtype=torch.float32)
    out, lse = merge_lse(parts)
    return (out if out.dtype == q.dtype else out.to(q.dtype)), lse


def _dropout_seed(dropout_p) -> int:
    """The seed of a call's dropout masks (backward regenerates them from it); 0 without dropout."""
    return int(torch.randint(2**62, ()).item()) if dropout_p > 0 else 0


class TorchPrefixAttention(torch.autograd.Function):
    """Autograd for the fused PyTorch path. Saves inputs, out and lse only."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, prefix_bias, seq_bias, seq_hidden, square_causal, dims, scale,
                dropout_p, engine):
        seed = _dropout_seed(dropout_p)
        out, lse = _attend(q, k, v, prefix_k, prefix_v, (prefix_bias, seq_bias, seq_hidden, square_causal), dims,
                           scale, dropout_p, engine, seed)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, prefix_bias, seq_bias, seq_hidden, out, lse)
        ctx.engine, ctx.dims, ctx.square_causal, ctx.scale = engine, dims, square_causal, scale
        ctx.dropout_p, ctx.seed = dropout_p, seed
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, prefix_k, prefix_v, prefix_bias, seq_bias, seq_hidden, out, lse = ctx.saved_tensors
        dims, engine = ctx.dims, ctx.engine
        prefix_bias_grad, seq_bias_grad = ctx.needs_input_grad[5:7]
        # Rows that see no key: L = +inf makes every probability exp(s - L) zero in backward.
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
        dout = _heads_inner(dout.to(q.dtype))
        dq = dprefix_bias = dseq_bias = None
        if dims.S:
            dq, dk, dv, dseq_bias = engine.backward(dout, q, k, v, out, lse, seq_bias, seq_hidden, ctx.square_causal,
                                                    ctx.scale, ctx.dropout_p, ctx.seed + 1, seq_bias_grad)
        else:  # empty tensors
            dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        if dims.P:
            dqp, dpk, dpv, dprefix_bias = _prefix_backward(dout, q, out, lse, prefix_k, prefix_v, prefix_bias, dims,
                                                           engine, (ctx.scale, ctx.dropout_p, ctx.seed,
                                                                    prefix_bias_grad))
            dq = dqp if dq is None else dq.add_(dqp)
        else:  # empty tensors
            dpk, dpv = torch.zeros_like(prefix_k), torch.zeros_like(prefix_v)
        if dq is None:
            dq = torch.zeros_like(q)
        grads = (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dpk.to(q.dtype), dpv.to(q.dtype))
        return (*grads, dprefix_bias, dseq_bias, None, None, None, None, None, None)


def torch_prefix_attention(q, k, v, prefix_k, prefix_v, dims: Dims, *, engine, causal, scale, attn_mask, attn_bias,
                           dropout_p):
    """The fused PyTorch path on validated inputs, each segment computed by `engine` (FlashCPU or Explicit).
    Returns (out [B, Hq, N, D] in q.dtype, lse [B, Hq, N]). Without gradients (grad mode off, or no input
    requiring one) it runs outside autograd and saves nothing. Both ways q is first brought to storage
    ordered [B, N, Hq, D] (a copy only when it is not), so that the outputs and the stacked q, out and lse of
    the prefix segment are views, and both compute the same."""
    masks = segment_masks(dims, causal, attn_mask, attn_bias, q.device)
    inputs = (q, k, v, prefix_k, prefix_v, attn_bias)
    q = _heads_inner(q)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return TorchPrefixAttention.apply(q, k, v, prefix_k, prefix_v, *masks, dims, scale, dropout_p, engine)
    return _attend(q, k, v, prefix_k, prefix_v, masks, dims, scale, dropout_p, engine, _dropout_seed(dropout_p))
