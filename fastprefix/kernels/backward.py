"""The backward kernels (preprocess, dQ, dK/dV, dBias) and their launcher `attention_backward`.

Backward reads a per-row "lse2" prepared by the preprocess kernel: lse * log2(e), with +inf for rows that see
no key, so their probabilities exp2(s - lse2) are exactly 0. Every gradient is deterministic: no atomics;
partial sums (a shared prefix's over rows and heads, a broadcast bias's) are added in a fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bank import BankTable, entry_gradients, entry_segment, prefix_args, prefix_tiles
from .common import (LOG2E, LOG2E_VALUE, broadcast_operand, chunks, compile_options, device_guard, dot, grad_scores,
                     kv_tiles, load_rows, prefix_strides, query_tile, sequence_ranges, strides)
from .tuning import DBIAS, DKDV, DQ, autotuned, features_of, fixed_launch, preprocess_block


@triton.jit
def _bwd_preprocess_kernel(OUT, DO, LSE, DELTA, LSE2, stride_ob, stride_oh, stride_on, stride_od,
                           stride_dob, stride_doh, stride_don, stride_dod, Hq, N,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                           BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O); lse2 = lse * log2(e), +inf for rows that see no key."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(2) * Hq + tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = offs_m < N
    d_ok = offs_d < HEAD_DIM
    rows64 = offs_m.to(tl.int64)[:, None]
    o = load_rows(OUT + b * stride_ob + h * stride_oh + rows64 * stride_on + offs_d[None, :] * stride_od, rows_ok,
                  d_ok, CHECK_ROWS=True, EVEN_D=EVEN_D)
    do = load_rows(DO + b * stride_dob + h * stride_doh + rows64 * stride_don + offs_d[None, :] * stride_dod,
                   rows_ok, d_ok, CHECK_ROWS=True, EVEN_D=EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = bh.to(tl.int64) * N + offs_m
    lse = tl.load(LSE + row, mask=rows_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    tl.store(DELTA + row, delta, mask=rows_ok)
    tl.store(LSE2 + row, lse2, mask=rows_ok)


@triton.jit
def _dq_stage(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, k_tile, v_tile, lo, hi, n_keys,
              offs_n, d_ok, qi, n_q, shift, scale_log2, bias_rows, stride_bj, mask_rows, stride_mj, seed, drop_rows,
              col0, dropout_p,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BOUNDS: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, EVEN_D: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dQ (unscaled) accumulated over key blocks [lo, hi) of one segment."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        kj = cols[None, :]
        start64 = tl.cast(start, tl.int64)
        k = load_rows(k_base + start64 * stride_kn + k_tile, cols < n_keys, d_ok, CHECK_ROWS=BOUNDS, EVEN_D=EVEN_D)
        v = load_rows(v_base + start64 * stride_vn + v_tile, cols < n_keys, d_ok, CHECK_ROWS=BOUNDS, EVEN_D=EVEN_D)
        zero = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        qk = dot(q, tl.trans(k), zero, UPCAST=UPCAST, PRECISION=PRECISION)
        dp = dot(do, tl.trans(v), zero, UPCAST=UPCAST, PRECISION=PRECISION)
        kj64 = kj.to(tl.int64)  # column x stride may pass 2**31 (a transposed bias or mask)
        _, ds = grad_scores(qk, dp, lse2[:, None], delta[:, None], qi, kj, n_q, n_keys, shift, scale_log2,
                            bias_rows + kj64 * stride_bj, mask_rows + kj64 * stride_mj, seed, drop_rows, col0 + kj,
                            dropout_p, BOUNDS=BOUNDS, CAUSAL=CAUSAL, HAS_BIAS=HAS_BIAS, HAS_MASK=HAS_MASK,
                            DROPOUT=DROPOUT)
        dq = dot(ds.to(k.dtype), k, dq, UPCAST=UPCAST, PRECISION=PRECISION)
    return dq


@triton.jit(do_not_specialize=["seed", "TUNE_Q", "TUNE_KV"])
def _dq_kernel(Q, K, V, PK, PV, ENTRIES, INDEX, BIAS, MASK, DO, LSE2, DELTA, DQ,
               stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
               stride_vb, stride_vh, stride_vn, stride_vd,
               stride_pkb, stride_pkh, stride_pkn, stride_pkd, stride_pvb, stride_pvh, stride_pvn, stride_pvd,
               stride_bb, stride_bh, stride_bn, stride_bj, stride_mb, stride_mh, stride_mn, stride_mj,
               stride_dob, stride_doh, stride_don, stride_dod, stride_dqb, stride_dqh, stride_dqn, stride_dqd,
               Hq, G, N, S, P, scale, scale_log2, dropout_p, seed, TUNE_Q, TUNE_KV,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
               DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BANK: tl.constexpr,
               ALIGN: tl.constexpr):
    """One program: dQ for BLOCK_M query rows of one (b, h), over prefix then sequence keys. BANK: as in the
    forward."""
    bh, b, h, hkv, m0, offs_m, offs_n, offs_d, d_ok, rows_ok, qi, qi64 = query_tile(
        Hq, G, N, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, HEAD_DIM=HEAD_DIM)

    q = load_rows(Q + b * stride_qb + h * stride_qh + qi64 * stride_qn + offs_d[None, :] * stride_qd, rows_ok, d_ok,
                  CHECK_ROWS=True, EVEN_D=EVEN_D)
    do = load_rows(DO + b * stride_dob + h * stride_doh + qi64 * stride_don + offs_d[None, :] * stride_dod, rows_ok,
                   d_ok, CHECK_ROWS=True, EVEN_D=EVEN_D)
    row = bh.to(tl.int64) * N + offs_m
    lse2 = tl.load(LSE2 + row, mask=rows_ok, other=float("inf"))
    delta = tl.load(DELTA + row, mask=rows_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bias_rows = BIAS + b * stride_bb + h * stride_bh + qi64 * stride_bn
    mask_rows = MASK + b * stride_mb + h * stride_mh + qi64 * stride_mn
    drop_rows = bh.to(tl.int64) * N + qi64
    shift = S - N

    pk_base, pv_base, pk_tile, pv_tile, pk_row, pv_row, p_row = prefix_tiles(
        PK, PV, ENTRIES, INDEX, b, hkv, stride_pkb, stride_pkh, stride_pkn, stride_pkd, stride_pvb, stride_pvh,
        stride_pvn, stride_pvd, P, offs_n, offs_d, BANK=BANK, ALIGN=ALIGN)
    dq = _dq_stage(
        dq, q, do, lse2, delta, pk_base, pv_base, pk_row, pv_row, pk_tile, pv_tile, 0, p_row, p_row, offs_n, d_ok, qi,
        N, shift, scale_log2, bias_rows, stride_bj, mask_rows, stride_mj, seed, drop_rows, 0, dropout_p,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BOUNDS=True, CAUSAL=False, HAS_BIAS=HAS_BIAS, HAS_MASK=False,
        DROPOUT=DROPOUT, EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION)

    full_hi, hi = sequence_ranges(m0, shift, S, CAUSAL=CAUSAL, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    seq_bias_rows = bias_rows + tl.cast(P, tl.int64) * stride_bj
    k_base, v_base, k_tile, v_tile = kv_tiles(K, V, b, hkv, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb,
                                              stride_vh, stride_vn, stride_vd, offs_n, offs_d)
    dq = _dq_stage(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, k_tile, v_tile, 0, full_hi, S, offs_n, d_ok,
        qi, N, shift, scale_log2, seq_bias_rows, stride_bj, mask_rows, stride_mj, seed, drop_rows, P,
        dropout_p, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BOUNDS=False, CAUSAL=False, HAS_BIAS=HAS_BIAS,
        HAS_MASK=HAS_MASK, DROPOUT=DROPOUT, EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION)
    dq = _dq_stage(
        dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, k_tile, v_tile, full_hi, hi, S, offs_n, d_ok,
        qi, N, shift, scale_log2, seq_bias_rows, stride_bj, mask_rows, stride_mj, seed, drop_rows, P,
        dropout_p, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BOUNDS=True, CAUSAL=CAUSAL, HAS_BIAS=HAS_BIAS,
        HAS_MASK=HAS_MASK, DROPOUT=DROPOUT, EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION)

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + qi64 * stride_dqn + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])


@triton.jit
def _dkdv_stage(dk, dv, k, v, q_base, do_base, stride_qn, stride_don, q_tile, do_tile, lse2_base, delta_base, lo,
                hi, n_q, offs_m, d_ok, kj, n_keys, shift, scale_log2, bias_cols, stride_bn, mask_cols, stride_mn,
                seed, row0, drop_cols, dropout_p,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    """dK (unscaled) and dV of one key block accumulated over query blocks [lo, hi) of one (b, h).

    Works in the transposed orientation ([keys, queries] tiles) so dK and dV accumulate without transposes.
    """
    for start in range(lo, hi, BLOCK_M):
        rows = start + offs_m
        rows_ok = rows < n_q
        qi = rows[None, :]
        qi64 = qi.to(tl.int64)
        start64 = tl.cast(start, tl.int64)
        q = load_rows(q_base + start64 * stride_qn + q_tile, rows_ok, d_ok, CHECK_ROWS=True, EVEN_D=EVEN_D)
        do = load_rows(do_base + start64 * stride_don + do_tile, rows_ok, d_ok, CHECK_ROWS=True, EVEN_D=EVEN_D)
        lse2 = tl.load(lse2_base + rows, mask=rows_ok, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=rows_ok, other=0.0)
        zero = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        qk = dot(k, tl.trans(q), zero, UPCAST=UPCAST, PRECISION=PRECISION)
        dp = dot(v, tl.trans(do), zero, UPCAST=UPCAST, PRECISION=PRECISION)
        kept, ds = grad_scores(qk, dp, lse2[None, :], delta[None, :], qi, kj, n_q, n_keys, shift, scale_log2,
                               bias_cols + qi64 * stride_bn, mask_cols + qi64 * stride_mn, seed, row0 + qi64,
                               drop_cols, dropout_p, BOUNDS=False, CAUSAL=CAUSAL, HAS_BIAS=HAS_BIAS,
                               HAS_MASK=HAS_MASK, DROPOUT=DROPOUT)
        dv = dot(kept.to(do.dtype), do, dv, UPCAST=UPCAST, PRECISION=PRECISION)
        dk = dot(ds.to(q.dtype), q, dk, UPCAST=UPCAST, PRECISION=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["seed", "TUNE_Q", "TUNE_KV"])
def _dkdv_kernel(Q, K, V, ENTRIES, ORDER, STARTS, BIAS, MASK, DO, LSE2, DELTA, DK, DV,
                 stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_bb, stride_bh, stride_bn, stride_bj, stride_mb, stride_mh, stride_mn, stride_mj,
                 stride_dob, stride_doh, stride_don, stride_dod,
                 stride_dkc, stride_dkh, stride_dkn, stride_dkd, stride_dvc, stride_dvh, stride_dvn, stride_dvd,
                 Hq, G, N, n_keys, col0, shift, pairs, per_chunk, scale, scale_log2, dropout_p, seed,
                 TUNE_Q, TUNE_KV,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                 DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BANK: tl.constexpr,
                 ALIGN: tl.constexpr):
    """dK, dV of one segment (prefix or sequence) whose keys are columns col0 .. col0 + n_keys of the P + S.

    One program: BLOCK_N keys of one KV head, summed over the (row, query head) pairs of its chunk: pairs
    t in [chunk * per_chunk, (chunk + 1) * per_chunk), t = b * G + g over all B * G pairs. The program
    writes its sum to DK[chunk], DV[chunk]. For a per-row segment per_chunk = G, so chunk = b and DK is the
    gradient itself; for a shared prefix (batch stride 0) DK holds per-chunk partial sums, added up by the
    caller in a fixed order.

    BANK: the segment is bank entry `chunk` (K, V: `BankTable.keys`, `values`; n_keys: the longest entry's P),
    summed over the rows that read it, order[starts[chunk]:starts[chunk + 1]] (`BankTable.groups`), and their
    G query heads, in that order; DK, DV are packed buffers (`BankTable.split`).
    """
    pid_n = tl.program_id(0)
    hkv = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kj = offs_n[:, None]
    kj64 = kj.to(tl.int64)
    chunk64 = tl.cast(chunk, tl.int64)
    if BANK:
        k_base, v_base, k_tile, v_tile, n_keys, t_lo, t_hi = entry_segment(
            K, V, ENTRIES, STARTS, chunk64, hkv, n0, G, stride_kd, stride_vd, offs_n.to(tl.int64), offs_d, ALIGN=ALIGN)
    else:
        t_lo = chunk * per_chunk
        t_hi = tl.minimum(t_lo + per_chunk, pairs)
        b_kv = (t_lo // G).to(tl.int64)
        k_base, v_base, k_tile, v_tile = kv_tiles(K, V, b_kv, hkv, stride_kb, stride_kh, stride_kn, stride_kd,
                                                  stride_vb, stride_vh, stride_vn, stride_vd, offs_n.to(tl.int64),
                                                  offs_d)
    keys_ok = offs_n < n_keys
    k = load_rows(k_base + k_tile, keys_ok, d_ok, CHECK_ROWS=True, EVEN_D=EVEN_D)
    v = load_rows(v_base + v_tile, keys_ok, d_ok, CHECK_ROWS=True, EVEN_D=EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_tile = offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    do_tile = offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod

    # Causal: query i sees key j iff i >= j - shift, so query blocks before m_lo see none of this key block.
    # The rest runs as one loop with the mask applied in every step: a second, unmasked copy of the loop for
    # the blocks below the diagonal (as the forward has) costs more registers than it saves.
    m_lo = 0
    if CAUSAL:
        m_lo = tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M
    for t in range(t_lo, t_hi):
        b = tl.load(ORDER + t // G) if BANK else (t // G).to(tl.int64)
        h = hkv * G + t % G
        bh = b * Hq + h
        dk, dv = _dkdv_stage(
            dk, dv, k, v, Q + b * stride_qb + h * stride_qh, DO + b * stride_dob + h * stride_doh, stride_qn,
            stride_don, q_tile, do_tile, LSE2 + bh * N, DELTA + bh * N, m_lo, N, N, offs_m, d_ok, kj, n_keys, shift,
            scale_log2, BIAS + b * stride_bb + h * stride_bh + (col0 + kj64) * stride_bj, stride_bn,
            MASK + b * stride_mb + h * stride_mh + kj64 * stride_mj, stride_mn, seed, bh * N, col0 + kj, dropout_p,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, CAUSAL=CAUSAL, HAS_BIAS=HAS_BIAS, HAS_MASK=HAS_MASK, DROPOUT=DROPOUT,
            EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION)

    out_mask = keys_ok[:, None] & d_ok[None, :]
    if BANK:  # after the loop: fewer registers held through it
        dk_base, dv_base = entry_gradients(ENTRIES, DK, DV, chunk64, hkv, n_keys, stride_dkn, stride_dvn)
    else:
        dk_base, dv_base = DK + chunk64 * stride_dkc + hkv * stride_dkh, DV + chunk64 * stride_dvc + hkv * stride_dvh
    dk_ptrs = dk_base + kj64 * stride_dkn + offs_d[None, :] * stride_dkd
    dv_ptrs = dv_base + kj64 * stride_dvn + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _dbias_block(Q, DO, LSE2, DELTA, K, V, BIAS, MASK,
                 stride_qb, stride_qh, stride_qn, stride_qd, stride_dob, stride_doh, stride_don, stride_dod,
                 stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_bb, stride_bh, stride_bn, stride_bj, stride_mb, stride_mh, stride_mn, stride_mj,
                 start, n_keys, col0, bb, hb, r, u_lo, u_hi, units_h, units_m, Hq, G, N, shift,
                 scale_log2, seed, dropout_p,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dScores of keys [start, start + BLOCK_N) of one segment, summed over the units [u_lo, u_hi).

    A unit is one (row, query head, query block) among those the bias is broadcast over:
    b = bb + u // (units_h * units_m), h = hb + (u // units_m) % units_h, query block r + u % units_m.
    Returns a [BLOCK_M, BLOCK_N] sum; hidden and out-of-range elements contribute 0.
    """
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    cols = start + tl.arange(0, BLOCK_N)
    kj = cols[None, :]
    kj64 = kj.to(tl.int64)
    cols64 = cols.to(tl.int64)[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for u in range(u_lo, u_hi):
        b = (bb + u // (units_h * units_m)).to(tl.int64)
        h = (hb + (u // units_m) % units_h).to(tl.int64)
        hkv = h // G
        bh = b * Hq + h
        rows = (r + u % units_m) * BLOCK_M + offs_m
        rows_ok = rows < N
        qi = rows[:, None]
        qi64 = qi.to(tl.int64)
        q = load_rows(Q + b * stride_qb + h * stride_qh + qi64 * stride_qn + offs_d[None, :] * stride_qd, rows_ok,
                      d_ok, CHECK_ROWS=True, EVEN_D=EVEN_D)
        do = load_rows(DO + b * stride_dob + h * stride_doh + qi64 * stride_don + offs_d[None, :] * stride_dod,
                       rows_ok, d_ok, CHECK_ROWS=True, EVEN_D=EVEN_D)
        k = load_rows(K + b * stride_kb + hkv * stride_kh + cols64 * stride_kn + offs_d[None, :] * stride_kd,
                      cols < n_keys, d_ok, CHECK_ROWS=True, EVEN_D=EVEN_D)
        v = load_rows(V + b * stride_vb + hkv * stride_vh + cols64 * stride_vn + offs_d[None, :] * stride_vd,
                      cols < n_keys, d_ok, CHECK_ROWS=True, EVEN_D=EVEN_D)
        lse2 = tl.load(LSE2 + bh * N + rows, mask=rows_ok, other=float("inf"))
        delta = tl.load(DELTA + bh * N + rows, mask=rows_ok, other=0.0)
        zero = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        qk = dot(q, tl.trans(k), zero, UPCAST=UPCAST, PRECISION=PRECISION)
        dp = dot(do, tl.trans(v), zero, UPCAST=UPCAST, PRECISION=PRECISION)
        _, ds = grad_scores(qk, dp, lse2[:, None], delta[:, None], qi, kj, N, n_keys, shift, scale_log2,
                            BIAS + b * stride_bb + h * stride_bh + qi64 * stride_bn + (col0 + kj64) * stride_bj,
                            MASK + b * stride_mb + h * stride_mh + qi64 * stride_mn + kj64 * stride_mj, seed,
                            bh * N + qi64, col0 + kj, dropout_p,
                            BOUNDS=True, CAUSAL=CAUSAL, HAS_BIAS=True, HAS_MASK=HAS_MASK, DROPOUT=DROPOUT)
        acc += ds
    return acc


@triton.jit(do_not_specialize=["seed"])
def _dbias_kernel(Q, K, V, PK, PV, BIAS, MASK, DO, LSE2, DELTA, DB,
                  stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                  stride_vb, stride_vh, stride_vn, stride_vd,
                  stride_pkb, stride_pkh, stride_pkn, stride_pkd, stride_pvb, stride_pvh, stride_pvn, stride_pvd,
                  stride_bb, stride_bh, stride_bn, stride_bj, stride_mb, stride_mh, stride_mn, stride_mj,
                  stride_dob, stride_doh, stride_don, stride_dod,
                  stride_dbc, stride_dbb, stride_dbh, stride_dbn, stride_dbj,
                  Hq, G, N, S, P, Hb, units_h, units_m, units, per_chunk, out_rows, chunks, scale_log2,
                  dropout_p, seed,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
                  SUM_COLS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Gradient of a broadcast bias, without atomics.

    The bias gradient is dScores summed over the dimensions the bias is broadcast along. One program owns
    bias rows r * BLOCK_M .. (or all rows, when the bias is broadcast over N) of bias (row bb, head hb) and
    sums the dScores of the units of its chunk (see `_dbias_block`); it writes DB[chunk, bb, hb, rows, cols]
    and the caller adds the chunks (and, for a bias broadcast over N, the rows) in a fixed order. There are
    as many chunks as the device needs programs in flight, not one per broadcast (row, head, query block).
    SUM_COLS: the bias has one column (broadcast over keys); sum over all keys into column 0.
    """
    r = tl.program_id(0)
    hb = tl.program_id(1)
    bb = tl.program_id(2) // chunks
    chunk = tl.program_id(2) % chunks
    u_lo = chunk * per_chunk
    u_hi = tl.minimum(u_lo + per_chunk, units)
    offs_n = tl.arange(0, BLOCK_N)
    out_r = r * BLOCK_M + tl.arange(0, BLOCK_M)
    out_ok = out_r < out_rows
    out_base = (DB + tl.cast(chunk, tl.int64) * stride_dbc + tl.cast(bb, tl.int64) * stride_dbb
                + tl.cast(hb, tl.int64) * stride_dbh + out_r.to(tl.int64) * stride_dbn)
    shift = S - N
    total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, P, BLOCK_N):
        ds = _dbias_block(Q, DO, LSE2, DELTA, PK, PV, BIAS, MASK,
                          stride_qb, stride_qh, stride_qn, stride_qd, stride_dob, stride_doh, stride_don, stride_dod,
                          stride_pkb, stride_pkh, stride_pkn, stride_pkd, stride_pvb, stride_pvh, stride_pvn,
                          stride_pvd, stride_bb, stride_bh, stride_bn, stride_bj, stride_mb, stride_mh, stride_mn,
                          stride_mj, start, P, 0, bb, hb, r, u_lo, u_hi, units_h, units_m, Hq, G, N, shift,
                          scale_log2, seed, dropout_p,
                          HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, EVEN_D=EVEN_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                          CAUSAL=False, HAS_MASK=False, DROPOUT=DROPOUT, UPCAST=UPCAST, PRECISION=PRECISION)
        if SUM_COLS:
            total += ds
        else:
            cols = start + offs_n
            tl.store(out_base[:, None] + cols.to(tl.int64)[None, :] * stride_dbj, ds,
                     mask=out_ok[:, None] & (cols < P)[None, :])
    for start in range(0, S, BLOCK_N):
        ds = _dbias_block(Q, DO, LSE2, DELTA, K, V, BIAS, MASK,
                          stride_qb, stride_qh, stride_qn, stride_qd, stride_dob, stride_doh, stride_don, stride_dod,
                          stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
                          stride_bb, stride_bh, stride_bn, stride_bj, stride_mb, stride_mh, stride_mn, stride_mj,
                          start, S, P, bb, hb, r, u_lo, u_hi, units_h, units_m, Hq, G, N, shift,
                          scale_log2, seed, dropout_p,
                          HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, EVEN_D=EVEN_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                          CAUSAL=CAUSAL, HAS_MASK=HAS_MASK, DROPOUT=DROPOUT, UPCAST=UPCAST, PRECISION=PRECISION)
        if SUM_COLS:
            total += ds
        else:
            cols = start + offs_n
            tl.store(out_base[:, None] + (P + cols).to(tl.int64)[None, :] * stride_dbj, ds,
                     mask=out_ok[:, None] & (cols < S)[None, :])
    if SUM_COLS:
        tl.store(out_base, tl.sum(total, 1), mask=out_ok)


_dq, _dkdv = autotuned(_dq_kernel, DQ), autotuned(_dkdv_kernel, DKDV)
_DKDV_MAX_BLOCK_N = max(config.block_n for config in DKDV.candidates)


def attention_backward(dout, q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, out, lse, *, causal: bool,
                       scale: float, dropout_p: float, seed: int, sequence_grad: bool = True, prefix_grad: bool = True,
                       bias_grad: bool, bank: BankTable | None = None):
    """Gradients of `attention_forward` given dout [B, Hq, N, D] and the forward's out and lse.

    Same arguments as `attention_forward` (the same `seed` regenerates the dropout mask). Returns
    (dq, dk, dv, dprefix_k, dprefix_v, dbias): gradients shaped like their inputs in q.dtype (a shared
    prefix's gradient summed over rows and query heads; with `bank`, lists of each entry's gradient, summed
    over the rows that read it); dk, dv only when `sequence_grad`, the prefix's only when `prefix_grad`, dbias
    (shaped like attn_bias) only when `bias_grad`, else None and not launched.
    Deterministic: no atomics; partial sums are added in a fixed order.
    """
    B, Hq, N, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    prefix = prefix_args(prefix_k, prefix_v, bank, q)
    P = prefix["P"]
    opts = compile_options(q)
    bias, bias_strides = broadcast_operand(attn_bias, (B, Hq, N, P + S), q, "b")
    mask, mask_strides = broadcast_operand(attn_mask, (B, Hq, N, S), q, "m")
    delta = torch.empty((B, Hq, N), dtype=torch.float32, device=q.device)
    lse2 = torch.empty((B, Hq, N), dtype=torch.float32, device=q.device)
    dq = torch.empty((B, Hq, N, D), dtype=q.dtype, device=q.device)
    # Arguments of every gradient kernel, and those of the tuned ones (dQ, dK/dV) only.
    common = dict(**strides("q", q), **bias_strides, **mask_strides, **strides("do", dout), Hq=Hq, G=Hq // Hkv,
                  N=N, scale_log2=scale * LOG2E_VALUE, dropout_p=dropout_p, seed=seed, DROPOUT=dropout_p > 0, **opts)
    tuned = dict(scale=scale, TUNE_Q=triton.next_power_of_2(N), HAS_BIAS=attn_bias is not None, **common)
    with device_guard(q):
        block = preprocess_block(opts["BLOCK_D"])
        _bwd_preprocess_kernel[(triton.cdiv(N, block), Hq, B)](
            out, dout, lse, delta, lse2, **strides("o", out), **strides("do", dout), Hq=Hq, N=N,
            HEAD_DIM=opts["HEAD_DIM"], BLOCK_D=opts["BLOCK_D"], EVEN_D=opts["EVEN_D"], BLOCK_M=block)
        _dq[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), Hq, B)](
            q, k, v, **prefix, BIAS=bias, MASK=mask, DO=dout, LSE2=lse2, DELTA=delta, DQ=dq,
            **strides("k", k), **strides("v", v), **strides("dq", dq), S=S, TUNE_KV=triton.next_power_of_2(P + S),
            CAUSAL=causal, HAS_MASK=attn_mask is not None, **tuned)

        def segment_grads(seg_k, seg_v, seg_strides, n_keys, col0, dk_out, dv_out, count, per_chunk, seg_causal,
                          seg_mask, grouped=None):
            _dkdv[lambda meta: (triton.cdiv(n_keys, meta["BLOCK_N"]), Hkv, count)](
                q, seg_k, seg_v, **(grouped or dict(ENTRIES=q, ORDER=q, STARTS=q, BANK=False, ALIGN=1)), BIAS=bias,
                MASK=mask, DO=dout, LSE2=lse2, DELTA=delta, DK=dk_out, DV=dv_out, **seg_strides,
                **strides("dk", dk_out, "chnd"), **strides("dv", dv_out, "chnd"), n_keys=n_keys, col0=col0,
                shift=S - N, pairs=B * (Hq // Hkv), per_chunk=per_chunk, TUNE_KV=triton.next_power_of_2(n_keys),
                CAUSAL=seg_causal, HAS_MASK=seg_mask, **tuned)

        dk = dv = dpk = dpv = None
        if sequence_grad:
            dk = torch.empty((B, Hkv, S, D), dtype=q.dtype, device=q.device)
            dv = torch.empty((B, Hkv, S, D), dtype=q.dtype, device=q.device)
            if S:
                segment_grads(k, v, {**strides("k", k), **strides("v", v)}, S, P, dk, dv, B, Hq // Hkv, causal,
                              attn_mask is not None)
        if prefix_grad and bank is not None:
            dpk, dpv = _bank_grads(bank, segment_grads, q.dtype)
        elif prefix_grad and P and prefix_k.dim() == 3:
            prefix_as_kv = {**prefix_strides("k", prefix_k), **prefix_strides("v", prefix_v)}
            count, per_chunk = chunks(B * (Hq // Hkv), Hkv * triton.cdiv(P, _DKDV_MAX_BLOCK_N), q.device)
            parts = torch.empty((2, count, Hkv, P, D), dtype=torch.float32, device=q.device)
            segment_grads(prefix_k, prefix_v, prefix_as_kv, P, 0, parts[0], parts[1], count, per_chunk, False, False)
            dpk, dpv = parts.sum(1).to(q.dtype)
        elif prefix_grad:
            dpk = torch.empty(prefix_k.shape, dtype=q.dtype, device=q.device)
            dpv = torch.empty(prefix_v.shape, dtype=q.dtype, device=q.device)
            if P:
                prefix_as_kv = {**prefix_strides("k", prefix_k), **prefix_strides("v", prefix_v)}
                segment_grads(prefix_k, prefix_v, prefix_as_kv, P, 0, dpk, dpv, B, Hq // Hkv, False, False)
        dbias = None
        if bias_grad:
            dbias = _bias_grad(q, k, v, prefix_k, prefix_v, attn_bias, mask, dout, lse2, delta, causal=causal,
                               has_mask=attn_mask is not None, common=common)
    return dq, dk, dv, dpk, dpv, dbias


def _bank_grads(bank: BankTable, segment_grads, dtype: torch.dtype) -> tuple[list, list]:
    """Each bank entry's dK, dV ([Hkv, P_t, D] in `dtype`), summed over the rows that read it: one dK/dV launch,
    one program per (key block, KV head, entry) looping over the entry's rows in order, written into packed
    buffers (`BankTable.split`); zeros for an entry no row reads."""
    Hkv, _, D = bank.keys.shape
    dk, dv = (torch.empty(Hkv * sum(bank.lengths) * D, dtype=dtype, device=bank.keys.device) for _ in "kv")
    if bank.max_p:
        order, starts = bank.groups()
        as_kv = dict(stride_kb=0, stride_kh=0, stride_kn=0, stride_kd=1, stride_vb=0, stride_vh=0, stride_vn=0,
                     stride_vd=1)
        # [1, 1, rows, D]: every entry's key rows, one after the other
        segment_grads(bank.keys, bank.values, as_kv, bank.max_p, 0, dk.view(1, 1, -1, D), dv.view(1, 1, -1, D),
                      len(bank.lengths), 1, False, False,
                      dict(ENTRIES=bank.entries, ORDER=order, STARTS=starts, BANK=True, ALIGN=bank.align))
    return bank.split(dk), bank.split(dv)


def _bias_grad(q, k, v, prefix_k, prefix_v, attn_bias, mask, dout, lse2, delta, *, causal, has_mask, common):
    """Gradient of attn_bias: dScores summed over the dimensions it is broadcast along (see `_dbias_kernel`).
    `common`: the arguments every gradient kernel takes."""
    B, Hq, N = q.shape[:3]
    S, P = k.shape[2], prefix_k.shape[-2]
    bias4 = attn_bias.reshape((1,) * (4 - attn_bias.dim()) + tuple(attn_bias.shape))
    Bb, Hb, Nb, Cb = bias4.shape
    if bias4.numel() == 0:
        return torch.zeros_like(attn_bias)
    launch = fixed_launch(DBIAS, DBIAS.preferred, q, block_d=common["BLOCK_D"],
                          features=features_of(dict(HAS_BIAS=True, HAS_MASK=has_mask, DROPOUT=common["DROPOUT"])))
    rows_broadcast = Nb == 1 and N > 1
    units_m = triton.cdiv(N, launch.block_m) if rows_broadcast else 1
    row_programs = 1 if rows_broadcast else triton.cdiv(N, launch.block_m)
    out_rows = launch.block_m if rows_broadcast else N
    sum_cols = Cb == 1 and P + S > 1
    units_h = Hq if Hb == 1 else 1
    units = (B if Bb == 1 else 1) * units_h * units_m
    count, per_chunk = chunks(units, row_programs * Bb * Hb, q.device)
    parts = torch.empty((count, Bb, Hb, out_rows, 1 if sum_cols else P + S), dtype=torch.float32, device=q.device)
    _dbias_kernel[(row_programs, Hb, Bb * count)](
        q, k, v, prefix_k, prefix_v, attn_bias, mask, dout, lse2, delta, parts,
        **strides("k", k), **strides("v", v), **prefix_strides("pk", prefix_k), **prefix_strides("pv", prefix_v),
        **strides("db", parts, "cbhnj"), S=S, P=P, Hb=Hb, units_h=units_h, units_m=units_m, units=units,
        per_chunk=per_chunk, out_rows=out_rows, chunks=count, CAUSAL=causal, HAS_MASK=has_mask, SUM_COLS=sum_cols,
        **launch.launch_options(), **common)
    grad = parts.sum(0)
    if rows_broadcast:
        grad = grad.sum(2, keepdim=True)
    return grad.to(attn_bias.dtype).reshape(attn_bias.shape)
