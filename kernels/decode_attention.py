"""Triton decode kernels: attention of a few queries per row (N <= DECODE_MAX_N) over [prefix ; sequence],
forward only (inference; training keeps the general kernels of `prefix_attention.py`).

Supported: what the general forward supports except dropout (inference draws none) and head dims above
DECODE_MAX_HEAD_DIM (the compile report covers D <= 128): q [B, Hq, N, D]; k, v [B, Hkv, S, D]; prefix
[Hkv, P, D] shared or [B, Hkv, P, D] per row; GQA/MQA; bottom-right causal masking of the sequence keys; a
bool mask over the sequence keys and a float bias over all P + S columns, read through broadcast strides;
fp16, bf16, fp32; any strides; P = 0, S = 0.

The work is split into parts, each an exact softmax over a disjoint range of key columns, written as fp32
partials (out normalized, lse in log2 units), then merged by log-sum-exp (DESIGN.md section 2):

* Shared prefix, read once per tile (`_decode_prefix_kernel`): the queries of all B rows x G query heads x
  N queries that read KV head h are stacked into one list of B * G * N rows, ordered (b, g, i). One program
  owns BLOCK_M of those rows and one key range of the prefix of head h, so each prefix block is loaded once
  per BLOCK_M stacked queries (once per batch when B * G * N <= BLOCK_M) instead of once per (row, head),
  and QK^T and PV are [BLOCK_M, BLOCK_N] and [BLOCK_M, D] tensor-core products. The prefix keys are split
  into ranges (split-K) across programs so that a small batch still fills the GPU.
* Per-row keys, split-KV (flash-decoding, `_decode_rows_kernel`): one program owns the G * N queries (or
  BLOCK_M of them) of one (row b, KV head h) and one key range of the row's sequence cache, so a K/V block
  is loaded once for all query heads of the group. A per-row prefix [B, Hkv, P, D] is one more such
  segment (columns 0 .. P, never masked).
* `_decode_merge_kernel`: one program per BLOCK_M output rows adds up the parts in a fixed order
  (deterministic, no atomics) and writes out in q.dtype and lse in natural log.

A part in which a row sees no key has lse = -inf and out = 0, so it weighs nothing in the merge; a row that
sees no key at all gets out = 0 and lse = -inf, as from the general kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import prefix_attention as general
from .prefix_attention import _LN2, _fwd_stage, _load_rows

DECODE_MAX_N = 16
"""Largest query count per row the decode kernels take. The general forward gives each (row, query head)
its own program with a query tile of at least 16 rows, so below 16 queries its tiles are mostly empty and
every program reloads the prefix and the row's keys; from 16 queries on its tiles fill and the prefill-style
grid has enough programs. 16 covers decoding (N = 1) and speculative steps with a few draft tokens."""

DECODE_MAX_HEAD_DIM = 128
"""Largest head dim of the decode kernels: the launch configs below are verified spill-free by the compile
report at D = 64 and 128 only."""

_MIN_SPLIT_BLOCKS = 4
"""Fewest key blocks per split: a split writes a [rows, D] fp32 partial and reads 2 x [keys, D] K/V, so
splitting finer than a few blocks (256 keys at BLOCK_N = 64) spends more bandwidth on partials than on keys."""


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _store_part(acc, l_i, m_i, PART_O, PART_L, part, out_rows, rows_ok, offs_d, d_ok, spop, spor, spod, splp):
    """Write one part of BLOCK_M rows: out normalized (0 where the row saw no key), lse in log2 units
    (-inf where the row saw no key)."""
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    lse2 = tl.where(seen, m_i + tl.math.log2(l_safe), float("-inf"))
    part64 = tl.cast(part, tl.int64)
    o_ptrs = PART_O + part64 * spop + out_rows[:, None] * spor + offs_d[None, :] * spod
    tl.store(o_ptrs, acc / l_safe[:, None], mask=rows_ok[:, None] & d_ok[None, :])
    tl.store(PART_L + part64 * splp + out_rows, lse2, mask=rows_ok)


@triton.jit
def _decode_prefix_kernel(Q, PK, PV, BIAS, PART_O, PART_L,
                          sqb, sqh, sqn, sqd, spkh, spkn, spkd, spvh, spvn, spvd, sbb, sbh, sbn, sbc,
                          spop, spor, spod, splp,
                          Hq, G, N, P, n_rows, per_split, part0, scale_log2,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                          PRECISION: tl.constexpr):
    """Shared prefix [Hkv, P, D]: one program = stacked query rows [pid0 * BLOCK_M, + BLOCK_M) of KV head
    pid1 (row r = (b * G + g) * N + i of the n_rows = B * G * N that read it) against prefix keys
    [pid2 * per_split, + per_split). Writes part part0 + pid2 of every one of its rows."""
    hkv = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = r < n_rows
    b = (r // (G * N)).to(tl.int64)
    g = (r // N) % G
    i = (r % N).to(tl.int64)
    h = hkv * G + g
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q = _load_rows(Q + b[:, None] * sqb + h[:, None] * sqh + i[:, None] * sqn + offs_d[None, :] * sqd, rows_ok,
                   d_ok, True, BLOCK_D != HEAD_DIM)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, P)
    bias_rows = BIAS + (b * sbb + h * sbh + i * sbn)[:, None]
    acc, l_i, m_i = _fwd_stage(
        acc, l_i, m_i, q, PK + hkv * spkh, PV + hkv * spvh, spkn, spvn,
        offs_n[:, None] * spkn + offs_d[None, :] * spkd, offs_n[:, None] * spvn + offs_d[None, :] * spvd,
        lo, hi, hi, offs_n, d_ok, r[:, None], n_rows, 0, scale_log2, bias_rows, sbc, BIAS, 0, 0, 0, 0, 0.0,
        BLOCK_M, BLOCK_N, True, False, HAS_BIAS, False, False, BLOCK_D != HEAD_DIM, UPCAST, PRECISION)
    out_rows = (b * Hq + h) * N + i
    _store_part(acc, l_i, m_i, PART_O, PART_L, part0 + split, out_rows, rows_ok, offs_d, d_ok, spop, spor, spod,
                splp)


@triton.jit
def _decode_rows_kernel(Q, K, V, BIAS, MASK, PART_O, PART_L,
                        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                        sbb, sbh, sbn, sbc, smb, smh, smn, sms, spop, spor, spod, splp,
                        Hkv, G, N, n_keys, col0, shift, per_split, part0, scale_log2,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                        HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Per-row keys K, V [B, Hkv, n_keys, D] (the sequence cache, or a per-row prefix), columns col0 ..
    col0 + n_keys of the P + S. One program = the queries [pid1 * BLOCK_M, + BLOCK_M) of the G * N
    (query r = g * N + i of head hkv * G + g) of row b = pid0 // Hkv, KV head pid0 % Hkv, against keys
    [pid2 * per_split, + per_split). Writes part part0 + pid2 of its rows. CAUSAL: query i sees key j iff
    j <= i + shift; HAS_MASK: the bool mask (sequence keys only)."""
    b = (tl.program_id(0) // Hkv).to(tl.int64)
    hkv = (tl.program_id(0) % Hkv).to(tl.int64)
    split = tl.program_id(2)
    r = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = r < G * N
    g = r // N
    i = (r % N).to(tl.int64)
    h = hkv * G + g
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q = _load_rows(Q + b * sqb + h[:, None] * sqh + i[:, None] * sqn + offs_d[None, :] * sqd, rows_ok, d_ok,
                   True, BLOCK_D != HEAD_DIM)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_keys)
    # Rows past the group get query index N: out of range, so no bias or mask element is read for them.
    qi = tl.where(rows_ok, i, N)[:, None]
    bias_rows = BIAS + (b * sbb + h * sbh + i * sbn)[:, None] + col0 * sbc
    mask_rows = MASK + (b * smb + h * smh + i * smn)[:, None]
    acc, l_i, m_i = _fwd_stage(
        acc, l_i, m_i, q, K + b * skb + hkv * skh, V + b * svb + hkv * svh, skn, svn,
        offs_n[:, None] * skn + offs_d[None, :] * skd, offs_n[:, None] * svn + offs_d[None, :] * svd,
        lo, hi, hi, offs_n, d_ok, qi, N, shift, scale_log2, bias_rows, sbc, mask_rows, sms, 0, 0, 0, 0.0,
        BLOCK_M, BLOCK_N, True, CAUSAL, HAS_BIAS, HAS_MASK, False, BLOCK_D != HEAD_DIM, UPCAST, PRECISION)
    out_rows = ((b * Hkv + hkv) * G + g) * N + i
    _store_part(acc, l_i, m_i, PART_O, PART_L, part0 + split, out_rows, rows_ok, offs_d, d_ok, spop, spor, spod,
                splp)


@triton.jit
def _decode_merge_kernel(PART_O, PART_L, OUT, LSE, spop, spor, spod, splp, sor, sod, n_rows, n_parts,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """out = sum_p 2^(lse2_p - L2) out_p, L2 = log2 sum_p 2^lse2_p over the parts, in part order, for output
    rows [pid * BLOCK_M, + BLOCK_M) of the B * Hq * N. OUT is [rows, D] (q.dtype); LSE natural log."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    for part in range(n_parts):
        part64 = tl.cast(part, tl.int64)
        lse2 = tl.load(PART_L + part64 * splp + rows64, mask=rows_ok, other=float("-inf"))
        o = tl.load(PART_O + part64 * spop + rows64[:, None] * spor + offs_d[None, :] * spod,
                    mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        m_new = tl.maximum(m, lse2)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all parts so far empty: weights 0, not NaN
        alpha = tl.math.exp2(m - m_ref)
        weight = tl.math.exp2(lse2 - m_ref)
        acc = acc * alpha[:, None] + o * weight[:, None]
        total = total * alpha + weight
        m = m_new
    seen = total > 0.0
    t_safe = tl.where(seen, total, 1.0)
    lse = tl.where(seen, (m + tl.math.log2(t_safe)) * _LN2, float("-inf"))
    o_ptrs = OUT + rows64[:, None] * sor + offs_d[None, :] * sod
    tl.store(o_ptrs, (acc / t_safe[:, None]).to(OUT.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])
    tl.store(LSE + rows64, lse, mask=rows_ok)


# ----------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages). SMALL: at most 16 stacked queries per program (one decoding step
# of a KV group of <= 16 heads, or of a small batch for the prefix). STACKED: more; 64 rows over 8 warps, on
# sm_90 wgmma (HGMMA) products. GATHER: the rows kernel with a mask or bias, whose per-element loads need
# the registers that larger tiles would take (64 x 64 and 64 x 32 spill on sm_80 there, 16 x 64 on sm_90).
# Spill-free at D = 64 and 128 on sm_80 and sm_90 (`python -m fastprefix.kernels.report`). The
# interpreter runs 16 x 16 tiles.
SMALL_LAUNCH = (16, 64, 4, 3)
STACKED_LAUNCH = (64, 64, 8, 3)
GATHER_LAUNCH = (16, 32, 4, 3)
MERGE_WARPS = 4


def decode_launch(kernel: str, rows: int, gathers: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the "prefix" or "rows" kernel for a tile that stacks
    `rows` queries; `gathers`: the call has a mask or a bias."""
    if general.INTERPRETED:
        return general._INTERPRETER_BLOCK, general._INTERPRETER_BLOCK, 4, 1
    if kernel == "rows" and gathers:
        return GATHER_LAUNCH
    return SMALL_LAUNCH if rows <= 16 else STACKED_LAUNCH


def merge_block(block_d: int) -> int:
    """Output rows per program of the merge (memory-bound, like the backward preprocess)."""
    return general.preprocess_block(block_d)


def splits(n_keys: int, block_n: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, keys per split) of `n_keys` keys for a launch of `programs` programs per split:
    enough splits for the device's target of programs in flight, each a whole number of key blocks and at
    least _MIN_SPLIT_BLOCKS of them (or all keys). No split is empty; the last may be shorter."""
    blocks = triton.cdiv(n_keys, block_n)
    count, per_split = general._chunks(triton.cdiv(blocks, _MIN_SPLIT_BLOCKS), programs, device)
    per_split = min(per_split * _MIN_SPLIT_BLOCKS, blocks) * block_n
    return triton.cdiv(n_keys, per_split), per_split


# ----------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------


def decode_forward(q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, *, causal: bool, scale: float):
    """Attention of a few queries per row over [prefix ; sequence] keys, forward only.

    Args:
        q: [B, Hq, N, D], N <= DECODE_MAX_N; k, v: [B, Hkv, S, D]; prefix_k, prefix_v: [Hkv, P, D] shared
            or [B, Hkv, P, D] per row. Any strides; fp16, bf16 or fp32; D <= DECODE_MAX_HEAD_DIM.
        attn_mask: None or bool broadcastable to [B, Hq, N, S] (True = visible).
        attn_bias: None or a tensor of q's dtype broadcastable to [B, Hq, N, P + S].
        causal: bottom-right causal mask on the sequence keys (query i sees key j iff j <= i + S - N).
        scale: score scale.

    Returns:
        out [B, Hq, N, D] (contiguous, q.dtype) and lse [B, Hq, N] float32 (natural log; -inf and out = 0
        for rows that see no key): the same as `attention_forward` without dropout, within rounding.
    """
    B, Hq, N, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], prefix_k.shape[-2]
    G = Hq // Hkv
    opts = general._compile_options(q)
    scale_log2 = scale * 1.4426950408889634
    shared = prefix_k.dim() == 3
    bias, bias_strides = general._broadcast(attn_bias, (B, Hq, N, P + S), q)
    mask, mask_strides = general._broadcast(attn_mask, (B, Hq, N, S), q)
    n_rows = B * Hq * N
    features = dict(HAS_BIAS=attn_bias is not None, **opts)

    # Key segments: (kernel, keys, values, number of keys, first column, causal, masked), each split in parts:
    # a shared prefix through the stacked-query kernel, per-row keys (a per-row prefix, the cache) through
    # the split-KV kernel.
    segments = []
    if P:
        segments.append(("prefix" if shared else "rows", prefix_k, prefix_v, P, 0, False, False))
    if S:
        segments.append(("rows", k, v, S, P, causal, attn_mask is not None))
    launches, n_parts = [], 0
    gathers = attn_mask is not None or attn_bias is not None
    for kind, seg_k, seg_v, n_keys, col0, seg_causal, seg_mask in segments:
        tile_rows = B * G * N if kind == "prefix" else G * N
        config = decode_launch(kind, tile_rows, gathers)
        programs = triton.cdiv(tile_rows, config[0]) * Hkv * (1 if kind == "prefix" else B)
        count, per_split = splits(n_keys, config[1], programs, q.device)
        launches.append((kind, seg_k, seg_v, n_keys, col0, seg_causal, seg_mask, config, count, per_split,
                         n_parts))
        n_parts += count

    out = torch.empty((B, Hq, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, N), dtype=torch.float32, device=q.device)
    part_o = torch.empty((n_parts, n_rows, D), dtype=torch.float32, device=q.device)
    part_l = torch.empty((n_parts, n_rows), dtype=torch.float32, device=q.device)
    part_strides = (*part_o.stride(), part_l.stride(0))
    with general._device_guard(q):
        for kind, seg_k, seg_v, n_keys, col0, seg_causal, seg_mask, config, count, per_split, part0 in launches:
            block_m, block_n, num_warps, num_stages = config
            launch = dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages, **features)
            if kind == "prefix":
                _decode_prefix_kernel[(triton.cdiv(B * G * N, block_m), Hkv, count)](
                    q, seg_k, seg_v, bias, part_o, part_l,
                    *q.stride(), *seg_k.stride(), *seg_v.stride(), *bias_strides, *part_strides,
                    Hq, G, N, n_keys, B * G * N, per_split, part0, scale_log2, **launch)
            else:
                _decode_rows_kernel[(B * Hkv, triton.cdiv(G * N, block_m), count)](
                    q, seg_k, seg_v, bias, mask, part_o, part_l,
                    *q.stride(), *seg_k.stride(), *seg_v.stride(), *bias_strides, *mask_strides, *part_strides,
                    Hkv, G, N, n_keys, col0, S - N, per_split, part0, scale_log2,
                    CAUSAL=seg_causal, HAS_MASK=seg_mask, **launch)
        block = general._INTERPRETER_BLOCK if general.INTERPRETED else merge_block(opts["BLOCK_D"])
        _decode_merge_kernel[(triton.cdiv(n_rows, block),)](
            part_o, part_l, out, lse, *part_strides, D, 1, n_rows, n_parts,
            HEAD_DIM=opts["HEAD_DIM"], BLOCK_D=opts["BLOCK_D"], BLOCK_M=block, num_warps=MERGE_WARPS)
    return out, lse
