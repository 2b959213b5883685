"""Attention over [entry index[b] of a prefix bank ; row b's sequence keys], in PyTorch.

A prefix bank holds T shared prefixes, entry t one [Hkv, P_t, D] pair per layer (P may differ between
entries); row b of a batch reads entry index[b]. The sequence segment is computed as in `torch_path`. The
prefix segment groups the rows by entry: the query rows of the rows that read entry t are stacked into one
[1, Hq, B_t * N, D] tensor that attends to entry t in one engine call, forward and backward, so entry t's
gradient comes out summed over its rows inside that call (deterministic), and no entry is ever copied per
row. q is brought into entry order once (a permutation of q's rows, the size of q) and the prefix segment's
results back by the inverse permutation. The two segments merge by log-sum-exp (`merge_lse`), as in
`torch_path`; backward recomputes each segment from the merged output and log-sum-exp (docs/design.md).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from .checks import Dims
from .segment_attention import NEG_INF, Explicit, FlashCPU
from .torch_path import _dropout_seed, _heads_inner, _stacked, _unstacked, merge_lse, segment_masks


@dataclass(frozen=True)
class Groups:
    """The rows of a batch grouped by the bank entry they read.

    order: [B] the rows sorted by entry (stable: rows of one entry keep their order); inverse: [B] its
    inverse permutation; entries: the entries read, ascending; sizes: how many rows read each of them.
    Rows order[start:start + sizes[i]] read entries[i], start being the sum of the sizes before it."""

    order: torch.Tensor
    inverse: torch.Tensor
    entries: tuple[int, ...]
    sizes: tuple[int, ...]

    @classmethod
    def of(cls, index: torch.Tensor, num_entries: int) -> Groups:
        """Groups of `index` [B] (integers in [0, num_entries))."""
        order = torch.sort(index, stable=True).indices
        counts = torch.bincount(index, minlength=num_entries).tolist()
        entries = tuple(t for t, count in enumerate(counts) if count)
        return cls(order, torch.argsort(order), entries, tuple(counts[t] for t in entries))

    def spans(self):
        """(entry, first row, rows) of each group, in the permuted order."""
        start = 0
        for entry, size in zip(self.entries, self.sizes):
            yield entry, start, size
            start += size


def _permuted(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """t [B, Hq, N, X] with its rows in `order`, its storage ordered [B, N, Hq, X] (so that `_stacked` of a
    slice of rows is a view)."""
    return t.transpose(1, 2).index_select(0, order).transpose(1, 2)


def _group_dims(dims: Dims, rows: int, entry_k: torch.Tensor) -> Dims:
    return dataclasses.replace(dims, B=rows, P=entry_k.shape[1])


def _prefix_forward(q, bank_k, bank_v, groups: Groups, dims: Dims, engine, scale, dropout_p, seed):
    """(out [B, Hq, N, D], lse [B, Hq, N]) of the prefix segment: one engine call per entry read, on the
    stacked query rows of its rows. An entry with P = 0 gives out = 0 and lse = -inf."""
    q = _permuted(q, groups.order)
    outs, lses = [], []
    for entry, start, rows in groups.spans():
        d = _group_dims(dims, rows, bank_k[entry])
        q_rows = q[start:start + rows]
        if d.P == 0:
            outs.append(torch.zeros_like(q_rows))
            lses.append(q_rows.new_full(q_rows.shape[:-1], NEG_INF, dtype=_lse_dtype(q.dtype)))
            continue
        out, lse = engine.forward(_stacked(q_rows, d), bank_k[entry][None], bank_v[entry][None], None, None, False,
                                  scale, dropout_p, seed + 2 + entry)
        outs.append(_unstacked(out, d))
        lses.append(_unstacked(lse, d))
    out = torch.cat(_common_dtype(outs)).index_select(0, groups.inverse)
    return out, torch.cat([lse.to(_lse_dtype(q.dtype)) for lse in lses]).index_select(0, groups.inverse)


def _common_dtype(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`tensors` in one dtype (an engine's results, and the zeros of entries with P = 0, may differ)."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return [t.to(dtype) for t in tensors]


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of both engines' log-sum-exps for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prefix_backward(dout, q, out, lse, bank_k, bank_v, groups: Groups, dims: Dims, engine, scale, dropout_p, seed):
    """(dq [B, Hq, N, D], dk per entry, dv per entry) of the prefix segment; each entry's gradient is summed over
    its rows inside its one engine call, entries no row reads get zeros."""
    dout, q, out = (_permuted(t, groups.order) for t in (dout, q, out))
    lse = lse.index_select(0, groups.order)
    dk = [torch.zeros_like(k) for k in bank_k]
    dv = [torch.zeros_like(v) for v in bank_v]
    dqs = []
    for entry, start, rows in groups.spans():
        d = _group_dims(dims, rows, bank_k[entry])
        if d.P == 0:
            dqs.append(torch.zeros_like(q[start:start + rows]))
            continue
        part = [_stacked(t[start:start + rows], d) for t in (dout, q, out, lse)]
        dq, dk_t, dv_t, _ = engine.backward(part[0], part[1], bank_k[entry][None], bank_v[entry][None], part[2],
                                            part[3], None, None, False, scale, dropout_p, seed + 2 + entry, False)
        dqs.append(_unstacked(dq, d))
        dk[entry], dv[entry] = dk_t[0], dv_t[0]
    return torch.cat(_common_dtype(dqs)).index_select(0, groups.inverse), dk, dv


def _attend(q, k, v, bank_k, bank_v, groups, seq_masks, dims: Dims, scale, dropout_p, engine, seed):
    """(out [B, Hq, N, D] in q.dtype, lse [B, Hq, N]) of both segments, merged."""
    seq_hidden, square_causal = seq_masks
    parts = []
    if dims.S:  # first: the merge overwrites its output buffer
        parts.append(engine.forward(q, k, v, None, seq_hidden, square_causal, scale, dropout_p, seed + 1))
    parts.append(_prefix_forward(q, bank_k, bank_v, groups, dims, engine, scale, dropout_p, seed))
    out, lse = merge_lse(parts)
    return (out if out.dtype == q.dtype else out.to(q.dtype)), lse


class BankPrefixAttention(torch.autograd.Function):
    """Autograd for bank attention. Saves inputs, out and lse only. `entries`: the T entries' keys, then
    their values."""

    @staticmethod
    def forward(ctx, q, k, v, groups, seq_masks, dims, scale, dropout_p, engine, *entries):
        T = len(entries) // 2
        seed = _dropout_seed(dropout_p)
        out, lse = _attend(q, k, v, entries[:T], entries[T:], groups, seq_masks, dims, scale, dropout_p, engine, seed)
        hidden, square_causal = seq_masks
        ctx.save_for_backward(q, k, v, hidden, out, lse, *entries)
        ctx.groups, ctx.square_causal, ctx.dims, ctx.scale = groups, square_causal, dims, scale
        ctx.dropout_p, ctx.engine, ctx.seed = dropout_p, engine, seed
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, hidden, out, lse, *entries = ctx.saved_tensors
        T, dims, engine = len(entries) // 2, ctx.dims, ctx.engine
        # Rows that see no key: L = +inf makes every probability exp(s - L) zero in backward.
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
        dout = _heads_inner(dout.to(q.dtype))
        options = (ctx.scale, ctx.dropout_p)
        dq, dk_bank, dv_bank = _prefix_backward(dout, q, out, lse, entries[:T], entries[T:], ctx.groups, dims, engine,
                                                *options, ctx.seed)
        if dims.S:
            dq_seq, dk, dv, _ = engine.backward(dout, q, k, v, out, lse, None, hidden, ctx.square_causal, *options,
                                                ctx.seed + 1, False)
            dq = dq.to(dq_seq.dtype).add_(dq_seq)
        else:  # empty tensors
            dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        grads = [g.to(t.dtype) for g, t in zip(dk_bank + dv_bank, entries)]
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, *grads)


def bank_engine(device: torch.device, dropout_p: float):
    """The segment engine of bank attention: PyTorch's CPU flash kernels on CPU without dropout, else Explicit."""
    return FlashCPU if device.type == "cpu" and dropout_p == 0 else Explicit


def torch_bank_attention(q, k, v, bank_k, bank_v, index, dims: Dims, *, causal, scale, attn_mask, dropout_p):
    """Bank attention on validated inputs (`dims` as `check_inputs` gives them for entry 0). Returns
    (out [B, Hq, N, D] in q.dtype, lse [B, Hq, N]). Without gradients it runs outside autograd."""
    _, _, hidden, square_causal = segment_masks(dims, causal, attn_mask, None, q.device)
    groups = Groups.of(index, len(bank_k))
    engine = bank_engine(q.device, dropout_p)
    inputs = (q, k, v, *bank_k, *bank_v)
    q = _heads_inner(q)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return BankPrefixAttention.apply(q, k, v, groups, (hidden, square_causal), dims, scale, dropout_p, engine,
                                         *bank_k, *bank_v)
    return _attend(q, k, v, bank_k, bank_v, groups, (hidden, square_causal), dims, scale, dropout_p, engine,
                   _dropout_seed(dropout_p))
