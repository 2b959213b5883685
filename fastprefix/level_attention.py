"""Attention over [level 0 ; level 1 ; ... ; row b's sequence keys] (cascade prompts), in PyTorch.

A level is a shared prefix (one [Hkv, P, D] pair read by every row) or a prefix bank read by row index (entries
[Hkv, P_t, D], row b reading entry index[b]). Each level is one more segment: a shared level is computed as
`torch_path` computes a shared prefix (one engine call on the stacked query rows of the whole batch), a bank
level as `bank_attention` computes its prefix segment (one engine call per entry read), the sequence segment as
in both. The segments merge by log-sum-exp, one at a time (`merge_lse`; the merge is associative). Backward
recomputes each segment from the merged output and log-sum-exp (docs/design.md), so every level is
differentiated on its own, whatever their number; nothing of any level is copied per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import bank_attention, torch_path
from .bank_attention import Groups, bank_engine
from .checks import Dims
from .segment_attention import NEG_INF
from .torch_path import _dropout_seed, _heads_inner, merge_lse, segment_masks

_SEED_STRIDE = 2**20
"""Dropout seeds of level i start at seed + (i + 1) * _SEED_STRIDE (a bank level adds 2 + its entry), so no
two segments of a call share a keep-mask."""


@dataclass(frozen=True)
class Level:
    """How one level is read. `dims`: the call's sizes with this level as the prefix (for a bank, with entry
    0); `groups`: the rows grouped by the entry they read, None for a shared level; `entries`: the number of
    key tensors of the level (1 for a shared level, T for a bank)."""

    dims: Dims
    groups: Groups | None = None
    entries: int = 1


def _split(levels: tuple[Level, ...], tensors) -> list[tuple[tuple, tuple]]:
    """(keys, values) of each level from the flat tensors: each level's keys, then its values, level by level."""
    found, start = [], 0
    for level in levels:
        n = level.entries
        found.append((tuple(tensors[start:start + n]), tuple(tensors[start + n:start + 2 * n])))
        start += 2 * n
    return found


def merge_all(parts):
    """`merge_lse` of any number of (out, lse) parts, folded left to right (overwrites the first output). After
    the first merge the output is in lse's dtype, and so is every later part brought to it."""
    out, lse = parts[0]
    for part_out, part_lse in parts[1:]:
        out, lse = merge_lse([(out, lse), (part_out.to(out.dtype), part_lse)])
    return out, lse


def _level_forward(q, level: Level, keys, values, engine, scale, dropout_p, seed):
    """(out, lse) of one level's segment, or None for a shared level with P = 0."""
    if level.groups is not None:
        return bank_attention._prefix_forward(q, keys, values, level.groups, level.dims, engine, scale, dropout_p,
                                              seed)
    if level.dims.P == 0:
        return None
    return torch_path._prefix_forward(q, keys[0], values[0], None, level.dims, engine, (scale, dropout_p, seed))


def _level_backward(dout, q, out, lse, level: Level, keys, values, engine, scale, dropout_p, seed):
    """(dq or None, dk per entry, dv per entry) of one level's segment, given the merged out and lse."""
    if level.groups is not None:
        return bank_attention._prefix_backward(dout, q, out, lse, keys, values, level.groups, level.dims, engine,
                                               scale, dropout_p, seed)
    if level.dims.P == 0:
        return None, [torch.zeros_like(keys[0])], [torch.zeros_like(values[0])]
    dq, dk, dv, _ = torch_path._prefix_backward(dout, q, out, lse, keys[0], values[0], None, level.dims, engine,
                                                (scale, dropout_p, seed, False))
    return dq, [dk], [dv]


def _attend(q, k, v, levels, tensors, seq_masks, dims: Dims, scale, dropout_p, engine, seed):
    """(out [B, Hq, N, D] in q.dtype, lse [B, Hq, N]) of the sequence and every level, merged."""
    seq_hidden, square_causal = seq_masks
    parts = []
    if dims.S:  # first: the merge overwrites its output buffer
        parts.append(engine.forward(q, k, v, None, seq_hidden, square_causal, scale, dropout_p, seed + 1))
    for i, (level, (keys, values)) in enumerate(zip(levels, _split(levels, tensors))):
        part = _level_forward(q, level, keys, values, engine, scale, dropout_p, seed + (i + 1) * _SEED_STRIDE)
        if part is not None:
            parts.append(part)
    if not parts:
        return torch.zeros_like(q), q.new_full(q.shape[:-1], NEG_INF, dtype=torch.float32)
    out, lse = merge_all(parts)
    return (out if out.dtype == q.dtype else out.to(q.dtype)), lse


class LevelsPrefixAttention(torch.autograd.Function):
    """Autograd for levels attention. Saves inputs, out and lse only. `tensors`: each level's keys then
    values, level by level (see `_split`)."""

    @staticmethod
    def forward(ctx, q, k, v, levels, seq_masks, dims, scale, dropout_p, engine, *tensors):
        seed = _dropout_seed(dropout_p)
        out, lse = _attend(q, k, v, levels, tensors, seq_masks, dims, scale, dropout_p, engine, seed)
        hidden, square_causal = seq_masks
        ctx.save_for_backward(q, k, v, hidden, out, lse, *tensors)
        ctx.levels, ctx.square_causal, ctx.dims, ctx.scale = levels, square_causal, dims, scale
        ctx.dropout_p, ctx.engine, ctx.seed = dropout_p, engine, seed
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, hidden, out, lse, *tensors = ctx.saved_tensors
        dims, engine, options = ctx.dims, ctx.engine, (ctx.scale, ctx.dropout_p)
        # Rows that see no key: L = +inf makes every probability exp(s - L) zero in backward.
        lse = lse.masked_fill(torch.isneginf(lse), float("inf"))
        dout = _heads_inner(dout.to(q.dtype))
        dq, grads = None, []
        for i, (level, (keys, values)) in enumerate(zip(ctx.levels, _split(ctx.levels, tensors))):
            dq_level, dk, dv = _level_backward(dout, q, out, lse, level, keys, values, engine, *options,
                                               ctx.seed + (i + 1) * _SEED_STRIDE)
            if dq_level is not None:
                dq = dq_level if dq is None else dq.to(torch.promote_types(dq.dtype, dq_level.dtype)).add_(dq_level)
            grads += [g.to(t.dtype) for g, t in zip(list(dk) + list(dv), keys + values)]
        if dims.S:
            dq_seq, dk, dv, _ = engine.backward(dout, q, k, v, out, lse, None, hidden, ctx.square_causal, *options,
                                                ctx.seed + 1, False)
            dq = dq_seq if dq is None else dq.to(dq_seq.dtype).add_(dq_seq)
        else:  # empty tensors
            dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dq = torch.zeros_like(q) if dq is None else dq
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, *grads)


def torch_levels_attention(q, k, v, levels, dims: Dims, *, causal, scale, attn_mask, dropout_p):
    """Levels attention on validated inputs. `levels`: one (prefix_k, prefix_v) pair per shared level and one
    (bank_k, bank_v, index) triple per bank level, in order; `dims` as `check_inputs` gives them for any level.
    Returns (out [B, Hq, N, D] in q.dtype, lse [B, Hq, N]). Without gradients it runs outside autograd."""
    _, _, hidden, square_causal = segment_masks(dims, causal, attn_mask, None, q.device)
    plan, tensors = [], []
    for level in levels:
        if len(level) == 3:
            bank_k, bank_v, index = level
            plan.append(Level(_level_dims(dims, bank_k[0]), Groups.of(index, len(bank_k)), len(bank_k)))
            tensors += [*bank_k, *bank_v]
        else:
            plan.append(Level(_level_dims(dims, level[0])))
            tensors += list(level)
    plan = tuple(plan)
    engine = bank_engine(q.device, dropout_p)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, *tensors))
    q = _heads_inner(q)
    if needs_grad:
        return LevelsPrefixAttention.apply(q, k, v, plan, (hidden, square_causal), dims, scale, dropout_p, engine,
                                           *tensors)
    return _attend(q, k, v, plan, tensors, (hidden, square_causal), dims, scale, dropout_p, engine,
                   _dropout_seed(dropout_p))


def _level_dims(dims: Dims, prefix_k: torch.Tensor) -> Dims:
    return Dims(dims.B, dims.Hq, dims.Hkv, dims.N, dims.S, prefix_k.shape[1], dims.D, True)
