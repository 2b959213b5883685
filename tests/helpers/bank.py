"""The oracle of a prefix bank read by row index, shared by the torch path's and the Triton kernels' tests."""

import torch

from fastprefix.reference import reference_attention


def bank_oracle(q, k, v, bank_k, bank_v, index, causal, mask, dtype):
    """Each row alone against its entry as a shared prefix, by the materializing reference in `dtype`."""
    outs, lses = [], []
    for b, t in enumerate(index.tolist()):
        out, lse = reference_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], bank_k[t], bank_v[t], causal=causal,
                                       attn_mask=None if mask is None else mask[b:b + 1], compute_dtype=dtype)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)
