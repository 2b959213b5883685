"""Attention over one segment of keys, forward and backward, in PyTorch.

A segment is q [b, Hq, n, D] against k, v [b, Hkv, s, D] (Hq a multiple of Hkv; query head h reads KV head
h // (Hq // Hkv)) with an optional float `bias` and an optional bool `hidden` (True = the key is hidden),
both 4-D and broadcastable to [b, Hq, n, s], and an optional square causal mask (`causal` is only passed
when n == s). Forward returns the segment's own normalized output and log-sum-exp (a row that sees no key:
out = 0, lse = -inf). Backward takes the *global* output and log-sum-exp of the whole attention (all
segments merged), which is what makes each segment's gradient exact on its own:

    p = exp(s - L_global),  dS = p * (dP - rowsum(dO * O_global))

and returns (dq, dk, dv, dbias), dbias only when asked for (`bias_grad`) and the engine computes one.

Two engines compute this:
* `FlashCPU`: PyTorch's blocked CPU flash-attention kernels (no n x s score matrix in memory; every input
  read through its strides). CPU only, no dropout, no bias gradient. They take one additive mask, so bias
  and hidden are combined, batch row by batch row when combining them at once would copy the bias for
  every row (T5's position bias [1, H, n, s] with a padding mask [b, 1, 1, s]).
* `Explicit`: scores as matrices, in float32 (float64 for float64 inputs), any device, dropout from a
  seeded generator so backward regenerates the forward's keep-mask, and a gradient for the bias.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def additive_mask(bias, hidden, dtype, device):
    """bias with -inf where hidden (either may be None); None when both are."""
    if hidden is None:
        return bias
    if bias is None:
        bias = torch.zeros((), dtype=dtype, device=device)
    return bias.masked_fill(hidden, NEG_INF)


class FlashCPU:
    """Segment attention by `aten._scaled_dot_product_flash_attention_for_cpu` and its backward."""

    @staticmethod
    def _row_by_row(bias, hidden) -> bool:
        """Whether combining bias and hidden would copy the bias once per batch row."""
        return bias is not None and hidden is not None and bias.shape[0] == 1 and hidden.shape[0] > 1

    @staticmethod
    def forward(q, k, v, bias, hidden, causal, scale, dropout_p, seed):
        if FlashCPU._row_by_row(bias, hidden):
            rows = [FlashCPU.forward(q[b:b + 1], k[b:b + 1], v[b:b + 1], bias, hidden[b:b + 1], causal, scale,
                                     dropout_p, seed) for b in range(q.shape[0])]
            return torch.cat([o for o, _ in rows]), torch.cat([lse for _, lse in rows])
        mask = additive_mask(bias, hidden, q.dtype, q.device)
        out, lse = torch._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        # The kernel reports out = 0 and lse = 0 for a row that sees no key; merging needs lse = -inf. Only rows
        # with lse exactly 0 can be such rows, so the mask is searched only when there are some.
        if mask is not None and bool((lse == 0).any()):
            lse = lse.masked_fill(FlashCPU._sees_nothing(mask, causal), NEG_INF)
        return out, lse

    @staticmethod
    def _sees_nothing(mask, causal) -> torch.Tensor:
        """[.., n] bool: the query rows whose every key is hidden, by the additive `mask` (-inf) [.., n or 1, s]
        and, when `causal` (square: query i sees keys 0 .. i), by causality too."""
        hidden = torch.isneginf(mask)
        if not causal:
            return hidden.all(dim=-1)
        # seen[..., r, j]: some key 0 .. j of mask row r is visible; query i sees nothing iff not seen[..., i, i]
        seen = (~hidden).cummax(dim=-1).values
        if seen.shape[-2] == 1:  # one mask row for every query
            return ~seen[..., 0, :]
        return ~seen.diagonal(dim1=-2, dim2=-1)

    @staticmethod
    def backward(dout, q, k, v, out, lse, bias, hidden, causal, scale, dropout_p, seed, bias_grad):
        if FlashCPU._row_by_row(bias, hidden):
            rows = [FlashCPU.backward(dout[b:b + 1], q[b:b + 1], k[b:b + 1], v[b:b + 1], out[b:b + 1],
                                      lse[b:b + 1], bias, hidden[b:b + 1], causal, scale, dropout_p, seed, False)
                    for b in range(q.shape[0])]
            dq, dk, dv = (torch.cat(grads) for grads in zip(*(row[:3] for row in rows)))
            return dq, dk, dv, None
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=additive_mask(bias, hidden, q.dtype, q.device),
            scale=scale)
        return dq, dk, dv, None


class Explicit:
    """Segment attention with explicit score matrices; supports dropout and bias gradients."""

    @staticmethod
    def _scores(q, k, bias, hidden, causal, scale):
        """Scores [b, Hkv, G, n, s] in the compute dtype, -inf where hidden."""
        hkv = k.shape[1]
        scores = torch.einsum("bhgnd,bhsd->bhgns", q.unflatten(1, (hkv, -1)), k) * scale
        if bias is not None:
            scores = scores + _split_heads(bias, hkv)
        if hidden is not None:
            scores = scores.masked_fill(_split_heads(hidden, hkv), NEG_INF)
        if causal:
            n = scores.shape[-1]
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), NEG_INF)
        return scores

    @staticmethod
    def _keep(shape, dropout_p, seed, device):
        """The dropout keep-mask scaled by 1 / (1 - p); regenerated identically from `seed`."""
        gen = torch.Generator(device=device).manual_seed(seed)
        keep = torch.rand(shape, generator=gen, device=device) >= dropout_p
        return keep / (1.0 - dropout_p)

    @staticmethod
    def forward(q, k, v, bias, hidden, causal, scale, dropout_p, seed):
        ct = _compute_dtype(q.dtype)
        bias = None if bias is None else bias.to(ct)
        scores = Explicit._scores(q.to(ct), k.to(ct), bias, hidden, causal, scale)
        lse = scores.logsumexp(dim=-1)
        probs = torch.exp(scores - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])
        if dropout_p > 0:
            probs = probs * Explicit._keep(probs.shape, dropout_p, seed, q.device)
        out = torch.einsum("bhgns,bhsd->bhgnd", probs, v.to(ct))
        return out.flatten(1, 2), lse.flatten(1, 2)

    @staticmethod
    def backward(dout, q, k, v, out, lse, bias, hidden, causal, scale, dropout_p, seed, bias_grad):
        ct = _compute_dtype(q.dtype)
        hkv = k.shape[1]
        q, k, v, dout, out = q.to(ct), k.to(ct), v.to(ct), dout.to(ct), out.to(ct)
        scores = Explicit._scores(q, k, None if bias is None else bias.to(ct), hidden, causal, scale)
        probs = torch.exp(scores - _split_heads(lse.to(ct)[..., None], hkv))
        do5 = dout.unflatten(1, (hkv, -1))
        dprobs = torch.einsum("bhgnd,bhsd->bhgns", do5, v)
        kept = probs
        if dropout_p > 0:
            keep = Explicit._keep(probs.shape, dropout_p, seed, q.device)
            kept = probs * keep
            dprobs = dprobs * keep
        delta = (dout * out).sum(dim=-1)
        dscores = probs * (dprobs - _split_heads(delta[..., None], hkv))
        dv = torch.einsum("bhgns,bhgnd->bhsd", kept, do5)
        dk = torch.einsum("bhgns,bhgnd->bhsd", dscores, q.unflatten(1, (hkv, -1))) * scale
        dq = torch.einsum("bhgns,bhsd->bhgnd", dscores, k).flatten(1, 2) * scale
        dbias = None
        if bias_grad:
            dbias = dscores.flatten(1, 2).sum_to_size(bias.shape).to(bias.dtype)
        return dq, dk, dv, dbias


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split_heads(t: torch.Tensor, hkv: int) -> torch.Tensor:
    """View a 4-D tensor broadcastable to [b, Hq, n, x] as broadcastable to [b, Hkv, G, n, x]."""
    if t.shape[1] == 1:
        return t.unsqueeze(2)
    return t.unflatten(1, (hkv, -1))
