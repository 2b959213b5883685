"""Attention over one segment of keys, forward and backward, in PyTorch.

A segment is q [b, Hq, n, D] against k, v [b, Hkv, s, D] (Hq a multiple of Hkv; query head h reads KV head
h // (Hq // Hkv)) with an optional additive float `mask` broadcastable to [b, Hq, n, s] and an optional
square causal mask (`causal` is only passed when n == s). Forward returns the segment's own normalized
output and log-sum-exp. Backward takes the *global* output and log-sum-exp of the whole attention (all
segments merged), which is what makes each segment's gradient exact on its own:

    p = exp(s - L_global),  dS = p * (dP - rowsum(dO * O_global))

Two engines compute this:
* `FlashCPU`: PyTorch's blocked CPU flash-attention kernels (no N x S score matrix in memory). CPU only,
  no dropout, no gradient for the mask.
* `Explicit`: scores as matrices, in float32 (float64 for float64 inputs), any device, dropout from a
  seeded generator so backward regenerates the forward's keep-mask, and a gradient for the mask.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def fill_empty_rows(lse: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Set the log-sum-exp of rows whose mask hides every key to -inf."""
    if mask is None:
        return lse
    return lse.masked_fill(torch.isneginf(mask).all(dim=-1), NEG_INF)


class FlashCPU:
    """Segment attention by `aten._scaled_dot_product_flash_attention_for_cpu` and its backward."""

    @staticmethod
    def forward(q, k, v, mask, causal, scale, dropout_p, seed):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        # The kernel reports lse = 0 for a row with no visible key; the merge needs -inf there.
        return out, fill_empty_rows(lse, mask)

    @staticmethod
    def backward(dout, q, k, v, out, lse, mask, causal, scale, dropout_p, seed):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)
        return dq, dk, dv, None


class Explicit:
    """Segment attention with explicit score matrices; supports dropout and mask gradients."""

    @staticmethod
    def _probabilities(q, k, mask, causal, scale, lse):
        """Scores [b, Hkv, G, n, s] in the compute dtype; probabilities if `lse` is given."""
        q5 = q.unflatten(1, (k.shape[1], q.shape[1] // k.shape[1]))
        scores = torch.einsum("bhgnd,bhsd->bhgns", q5, k) * scale
        if mask is not None:
            scores = scores + _split_heads(mask, k.shape[1])
        if causal:
            n = scores.shape[-1]
            upper = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(upper, NEG_INF)
        if lse is None:
            return scores
        return torch.exp(scores - _split_heads(lse[..., None], k.shape[1]))

    @staticmethod
    def _keep(shape, dropout_p, seed, device):
        """The dropout keep-mask scaled by 1 / (1 - p); regenerated identically from `seed`."""
        gen = torch.Generator(device=device).manual_seed(seed)
        keep = torch.rand(shape, generator=gen, device=device) >= dropout_p
        return keep / (1.0 - dropout_p)

    @staticmethod
    def forward(q, k, v, mask, causal, scale, dropout_p, seed):
        ct = _compute_dtype(q.dtype)
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
        mask = None if mask is None else mask.to(ct)
        scores = Explicit._probabilities(q, k, mask, causal, scale, None)
        lse = scores.logsumexp(dim=-1)
        probs = torch.exp(scores - lse.masked_fill(torch.isneginf(lse), 0.0)[..., None])
        if dropout_p > 0:
            probs = probs * Explicit._keep(probs.shape, dropout_p, seed, q.device)
        out = torch.einsum("bhgns,bhsd->bhgnd", probs, v)
        return out.flatten(1, 2), lse.flatten(1, 2)

    @staticmethod
    def backward(dout, q, k, v, out, lse, mask, causal, scale, dropout_p, seed):
        ct = _compute_dtype(q.dtype)
        hkv = k.shape[1]
        q, k, v, dout, out = q.to(ct), k.to(ct), v.to(ct), dout.to(ct), out.to(ct)
        mask_ct = None if mask is None else mask.to(ct)
        probs = Explicit._probabilities(q, k, mask_ct, causal, scale, lse.to(ct))
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
        dmask = None
        if mask is not None and mask.requires_grad:
            dmask = dscores.flatten(1, 2).sum_to_size(mask.shape).to(mask.dtype)
        return dq, dk, dv, dmask


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split_heads(t: torch.Tensor, hkv: int) -> torch.Tensor:
    """View a tensor broadcastable to [b, Hq, n, x] as broadcastable to [b, Hkv, G, n, x]."""
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    if t.shape[1] == 1:
        return t.unsqueeze(2)
    return t.unflatten(1, (hkv, -1))
