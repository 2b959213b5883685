"""The oracle: attention over the explicitly concatenated keys [prefix ; sequence].

Obviously right and deliberately slow: it copies the prefix into every row, repeats K/V for every query
head and builds the full score matrix. Tests, benchmarks and `fastprefix check` compare against it;
it is never a fast path.
"""

from __future__ import annotations

import torch


def causal_visibility(N: int, S: int, device) -> torch.Tensor:
    """[N, S] bool: query i sees sequence key j iff j <= i + (S - N) (bottom-right aligned)."""
    rows = torch.arange(N, device=device)[:, None]
    cols = torch.arange(S, device=device)[None, :]
    return cols <= rows + (S - N)


def reference_attention(q, k, v, prefix_k, prefix_v, *, causal=False, scale=None, attn_mask=None,
                        attn_bias=None, dropout_p=0.0, compute_dtype=torch.float32):
    """Attention of q over concat(prefix, sequence) computed in `compute_dtype`.

    Shapes as in `prefix_attention`. Returns (out [B, Hq, N, D] in compute_dtype, lse [B, Hq, N] in
    compute_dtype); rows that see no key get out = 0 and lse = -inf.
    """
    B, Hq, N, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = prefix_k.shape[-2]
    scale = D ** -0.5 if scale is None else scale
    if prefix_k.dim() == 3:
        prefix_k, prefix_v = prefix_k.expand(B, -1, -1, -1), prefix_v.expand(B, -1, -1, -1)
    keys = torch.cat([prefix_k, k], dim=2).to(compute_dtype).repeat_interleave(Hq // Hkv, dim=1)
    values = torch.cat([prefix_v, v], dim=2).to(compute_dtype).repeat_interleave(Hq // Hkv, dim=1)

    scores = q.to(compute_dtype) @ keys.transpose(-1, -2) * scale
    if attn_bias is not None:
        scores = scores + attn_bias.to(compute_dtype)
    visible = torch.ones(B, Hq, N, P + S, dtype=torch.bool, device=q.device)
    if causal:
        visible[..., P:] &= causal_visibility(N, S, q.device)
    if attn_mask is not None:
        visible[..., P:] &= attn_mask
    scores = scores.masked_fill(~visible, float("-inf"))

    # Rows that see no key: lse = -inf and probabilities 0, with gradients 0 (not the NaN of logsumexp's).
    empty = torch.isneginf(scores).all(dim=-1)
    lse = scores.masked_fill(empty[..., None], 0.0).logsumexp(dim=-1).masked_fill(empty, float("-inf"))
    probs = torch.exp(scores - lse.masked_fill(empty, 0.0)[..., None])
    if dropout_p > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    return probs @ values, lse
