"""Triton kernels for attention over the keys [prefix ; sequence] without concatenating them.

Supported: q [B, Hq, N, D]; sequence k, v [B, Hkv, S, D]; prefix k, v [B, Hkv, P, D] (batch stride 0 for a
prefix shared by every row); GQA/MQA (query head h reads KV head h // (Hq // Hkv)); bottom-right causal
masking of the sequence keys (query i sees key j iff j <= i + S - N; prefix keys are always visible); a
bool mask over the sequence keys and a float bias over all P + S columns, both read through broadcast
strides (stride 0, never expanded in memory); dropout on the probabilities (Philox, keyed by seed and
element position, so backward regenerates the forward's mask); head dims up to 256 (padded to a power of
two with masked loads); fp16, bf16, fp32 (fp32 dots in IEEE fp32); any strides; P = 0 and S = 0.

Layout: private @triton.jit kernels first, then the launchers `attention_forward` / `attention_backward`
(tensors in, tensors out, strides passed explicitly). No autograd here.

Scores are kept in log2 units (scaled by log2(e)) so the softmax uses exp2; `lse` is returned in natural
log. Backward reads a per-row "lse2" prepared by the preprocess kernel: lse * log2(e), with +inf for rows
that see no key, so their probabilities exp2(s - lse2) are exactly 0.

Under TRITON_INTERPRET=1 (set before this module is imported) the same kernels run on CPU tensors. The
interpreter's tl.dot is wrong for bf16 operands, so dots are upcast to fp32 there (UPCAST).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)
"""True when the kernels below were created by Triton's interpreter (TRITON_INTERPRET=1 at import)."""

MAX_HEAD_DIM = 256

_LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
_LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _load_rows(ptrs, rows_ok, d_ok, CHECK_ROWS: tl.constexpr, CHECK_D: tl.constexpr):
    """A [rows, BLOCK_D] tile; rows outside the tensor and padded head-dim columns read as 0."""
    if CHECK_ROWS and CHECK_D:
        tile = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif CHECK_D:
        tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _logits(qk, qi, kj, n_q, n_keys, shift, scale_log2, bias_ptrs, mask_ptrs,
            BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr):
    """Scores in log2 units, -inf where the key is hidden.

    qk is q . k for query indices qi and key indices kj (broadcast against each other, in either
    orientation); bias_ptrs / mask_ptrs point at the bias and mask elements of the tile. BOUNDS hides keys
    >= n_keys, CAUSAL hides keys j > i + shift.
    """
    s = qk * scale_log2
    if HAS_BIAS or HAS_MASK:
        in_range = (qi < n_q) & (kj < n_keys)
    if HAS_BIAS:
        s += tl.load(bias_ptrs, mask=in_range, other=0.0).to(tl.float32) * _LOG2E
    if BOUNDS or CAUSAL or HAS_MASK:
        visible = kj < n_keys
        if CAUSAL:
            visible = visible & (kj <= qi + shift)
        if HAS_MASK:
            visible = visible & (tl.load(mask_ptrs, mask=in_range, other=0) != 0)
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def _keep(seed, rows, cols, dropout_p):
    """Dropout keep decisions, P(keep) = 1 - dropout_p, for query rows `rows` (int64 b * Hq * N + h * N + i)
    and key columns `cols` (0 .. P + S), broadcast against each other. Philox keyed by the seed with the
    counter (column, row low word, row high word, 0): a decision depends on (seed, row, column) alone, so
    every kernel regenerates the forward's mask in any tile orientation."""
    c0, c1 = tl.broadcast(cols.to(tl.uint32), rows.to(tl.uint32))
    c2 = tl.broadcast_to((rows >> 32).to(tl.uint32), c0.shape)
    bits, _, _, _ = tl.philox(seed, c0, c1, c2, tl.zeros_like(c0))
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _grad_scores(qk, dp, lse2, delta, qi, kj, n_q, n_keys, shift, scale_log2, bias_ptrs, mask_ptrs,
                 seed, drop_rows, drop_cols, dropout_p,
                 BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                 DROPOUT: tl.constexpr):
    """From q.k and dO.v of a tile: (probabilities after dropout, dScores).

    p = exp(s - L) with the global lse; with dropout the kept probabilities are p * keep / (1 - dropout_p)
    and dP is scaled the same way; dS = p * (dP - rowsum(dO * O)). dS is the gradient of the natural-unit
    score, i.e. of the bias.
    """
    s = _logits(qk, qi, kj, n_q, n_keys, shift, scale_log2, bias_ptrs, mask_ptrs, BOUNDS, CAUSAL, HAS_BIAS,
                HAS_MASK)
    p = tl.math.exp2(s - lse2)
    kept = p
    if DROPOUT:
        keep = _keep(seed, drop_rows, drop_cols, dropout_p)
        kept = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    return kept, p * (dp - delta)


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_stage(acc, l_i, m_i, q, k_base, v_base, skn, svn, k_tile, v_tile, lo, hi, n_keys, offs_n, d_ok,
               qi, n_q, shift, scale_log2, bias_rows, sbc, mask_rows, sms, seed, drop_rows, col0, dropout_p,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BOUNDS: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, CHECK_D: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi) of one segment (prefix or sequence)."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        kj = cols[None, :]
        start64 = tl.cast(start, tl.int64)
        k = _load_rows(k_base + start64 * skn + k_tile, cols < n_keys, d_ok, BOUNDS, CHECK_D)
        qk = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST, PRECISION)
        s = _logits(qk, qi, kj, n_q, n_keys, shift, scale_log2, bias_rows + kj * sbc, mask_rows + kj * sms,
                    BOUNDS, CAUSAL, HAS_BIAS, HAS_MASK)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only hidden keys keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(seed, drop_rows, col0 + kj, dropout_p), p / (1.0 - dropout_p), 0.0)
        v = _load_rows(v_base + start64 * svn + v_tile, cols < n_keys, d_ok, BOUNDS, CHECK_D)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_tile(Hq, G, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                HEAD_DIM: tl.constexpr):
    """The tile of a forward or dQ program: query rows [pid0 * BLOCK_M, + BLOCK_M) of query head pid1 of row
    pid2. Returns (bh, b, h, hkv, m0, offs_m, offs_n, offs_d, d_ok, rows_ok, qi, qi64)."""
    bh = tl.program_id(2) * Hq + tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    m0 = tl.program_id(0) * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    qi = offs_m[:, None]
    return (bh, b, h, h // G, m0, offs_m, tl.arange(0, BLOCK_N), offs_d, offs_d < HEAD_DIM, offs_m < N, qi,
            qi.to(tl.int64))


@triton.jit
def _sequence_ranges(m0, shift, S, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full_hi, hi) for the query tile starting at row m0: sequence keys [0, full_hi) are seen in full by
    every row of the tile (no per-element mask), [full_hi, hi) need the mask, keys from hi on are hidden from
    every row (causal, query i sees key j iff j <= i + shift)."""
    full_hi = S // BLOCK_N * BLOCK_N
    hi = S
    if CAUSAL:
        full_hi = tl.minimum(tl.maximum(m0 + shift + 1, 0) // BLOCK_N * BLOCK_N, full_hi)
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + shift, 0), S)
    return full_hi, hi


@triton.jit(do_not_specialize=["seed", "TUNE_Q", "TUNE_KV"])
def _fwd_kernel(Q, K, V, PK, PV, BIAS, MASK, OUT, LSE,
                sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                spkb, spkh, spkn, spkd, spvb, spvh, spvn, spvd,
                sbb, sbh, sbn, sbc, smb, smh, smn, sms, sob, soh, son, sod,
                Hq, G, N, S, P, scale_log2, dropout_p, seed, TUNE_Q, TUNE_KV,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One program: BLOCK_M query rows of one (row b, query head h). Writes out and lse (natural log)."""
    bh, b, h, hkv, m0, offs_m, offs_n, offs_d, d_ok, rows_ok, qi, qi64 = _query_tile(
        Hq, G, N, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM)

    q = _load_rows(Q + b * sqb + h * sqh + qi64 * sqn + offs_d[None, :] * sqd, rows_ok, d_ok, True,
                   BLOCK_D != HEAD_DIM)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    bias_rows = BIAS + b * sbb + h * sbh + qi64 * sbn
    mask_rows = MASK + b * smb + h * smh + qi64 * smn
    drop_rows = bh.to(tl.int64) * N + qi64
    shift = S - N

    acc, l_i, m_i = _fwd_stage(
        acc, l_i, m_i, q, PK + b * spkb + hkv * spkh, PV + b * spvb + hkv * spvh, spkn, spvn,
        offs_n[:, None] * spkn + offs_d[None, :] * spkd, offs_n[:, None] * spvn + offs_d[None, :] * spvd,
        0, P, P, offs_n, d_ok, qi, N, shift, scale_log2, bias_rows, sbc, mask_rows, sms, seed, drop_rows, 0,
        dropout_p, BLOCK_M, BLOCK_N, True, False, HAS_BIAS, False, DROPOUT, BLOCK_D != HEAD_DIM, UPCAST,
        PRECISION)

    full_hi, hi = _sequence_ranges(m0, shift, S, CAUSAL, BLOCK_M, BLOCK_N)
    k_base = K + b * skb + hkv * skh
    v_base = V + b * svb + hkv * svh
    k_tile = offs_n[:, None] * skn + offs_d[None, :] * skd
    v_tile = offs_n[:, None] * svn + offs_d[None, :] * svd
    acc, l_i, m_i = _fwd_stage(
        acc, l_i, m_i, q, k_base, v_base, skn, svn, k_tile, v_tile, 0, full_hi, S, offs_n, d_ok, qi, N, shift,
        scale_log2, bias_rows + P * sbc, sbc, mask_rows, sms, seed, drop_rows, P, dropout_p,
        BLOCK_M, BLOCK_N, False, False, HAS_BIAS, HAS_MASK, DROPOUT, BLOCK_D != HEAD_DIM, UPCAST, PRECISION)
    acc, l_i, m_i = _fwd_stage(
        acc, l_i, m_i, q, k_base, v_base, skn, svn, k_tile, v_tile, full_hi, hi, S, offs_n, d_ok, qi, N, shift,
        scale_log2, bias_rows + P * sbc, sbc, mask_rows, sms, seed, drop_rows, P, dropout_p,
        BLOCK_M, BLOCK_N, True, CAUSAL, HAS_BIAS, HAS_MASK, DROPOUT, BLOCK_D != HEAD_DIM, UPCAST, PRECISION)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * _LN2, float("-inf"))
    o_ptrs = OUT + b * sob + h * soh + qi64 * son + offs_d[None, :] * sod
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, lse, mask=rows_ok)


# ----------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_preprocess_kernel(OUT, DO, LSE, DELTA, LSE2, sob, soh, son, sod, sdb, sdh, sdn, sdd, Hq, N,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
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
    o = _load_rows(OUT + b * sob + h * soh + rows64 * son + offs_d[None, :] * sod, rows_ok, d_ok, True,
                   BLOCK_D != HEAD_DIM)
    do = _load_rows(DO + b * sdb + h * sdh + rows64 * sdn + offs_d[None, :] * sdd, rows_ok, d_ok, True,
                    BLOCK_D != HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    row = bh.to(tl.int64) * N + offs_m
    lse = tl.load(LSE + row, mask=rows_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    tl.store(DELTA + row, delta, mask=rows_ok)
    tl.store(LSE2 + row, lse2, mask=rows_ok)


@triton.jit
def _dq_stage(dq, q, do, lse2, delta, k_base, v_base, skn, svn, k_tile, v_tile, lo, hi, n_keys, offs_n, d_ok,
              qi, n_q, shift, scale_log2, bias_rows, sbc, mask_rows, sms, seed, drop_rows, col0, dropout_p,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BOUNDS: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, CHECK_D: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dQ (unscaled) accumulated over key blocks [lo, hi) of one segment."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        kj = cols[None, :]
        start64 = tl.cast(start, tl.int64)
        k = _load_rows(k_base + start64 * skn + k_tile, cols < n_keys, d_ok, BOUNDS, CHECK_D)
        v = _load_rows(v_base + start64 * svn + v_tile, cols < n_keys, d_ok, BOUNDS, CHECK_D)
        zero = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        qk = _dot(q, tl.trans(k), zero, UPCAST, PRECISION)
        dp = _dot(do, tl.trans(v), zero, UPCAST, PRECISION)
        _, ds = _grad_scores(qk, dp, lse2[:, None], delta[:, None], qi, kj, n_q, n_keys, shift, scale_log2,
                             bias_rows + kj * sbc, mask_rows + kj * sms, seed, drop_rows, col0 + kj, dropout_p,
                             BOUNDS, CAUSAL, HAS_BIAS, HAS_MASK, DROPOUT)
        dq = _dot(ds.to(k.dtype), k, dq, UPCAST, PRECISION)
    return dq


@triton.jit(do_not_specialize=["seed", "TUNE_Q", "TUNE_KV"])
def _dq_kernel(Q, K, V, PK, PV, BIAS, MASK, DO, LSE2, DELTA, DQ,
               sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
               spkb, spkh, spkn, spkd, spvb, spvh, spvn, spvd,
               sbb, sbh, sbn, sbc, smb, smh, smn, sms, sdob, sdoh, sdon, sdod, sdqb, sdqh, sdqn, sdqd,
               Hq, G, N, S, P, scale, scale_log2, dropout_p, seed, TUNE_Q, TUNE_KV,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
               UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """One program: dQ for BLOCK_M query rows of one (b, h), over prefix then sequence keys."""
    bh, b, h, hkv, m0, offs_m, offs_n, offs_d, d_ok, rows_ok, qi, qi64 = _query_tile(
        Hq, G, N, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM)

    q = _load_rows(Q + b * sqb + h * sqh + qi64 * sqn + offs_d[None, :] * sqd, rows_ok, d_ok, True,
                   BLOCK_D != HEAD_DIM)
    do = _load_rows(DO + b * sdob + h * sdoh + qi64 * sdon + offs_d[None, :] * sdod, rows_ok, d_ok, True,
                    BLOCK_D != HEAD_DIM)
    row = bh.to(tl.int64) * N + offs_m
    lse2 = tl.load(LSE2 + row, mask=rows_ok, other=float("inf"))
    delta = tl.load(DELTA + row, mask=rows_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bias_rows = BIAS + b * sbb + h * sbh + qi64 * sbn
    mask_rows = MASK + b * smb + h * smh + qi64 * smn
    drop_rows = bh.to(tl.int64) * N + qi64
    shift = S - N

    dq = _dq_stage(
        dq, q, do, lse2, delta, PK + b * spkb + hkv * spkh, PV + b * spvb + hkv * spvh, spkn, spvn,
        offs_n[:, None] * spkn + offs_d[None, :] * spkd, offs_n[:, None] * spvn + offs_d[None, :] * spvd,
        0, P, P, offs_n, d_ok, qi, N, shift, scale_log2, bias_rows, sbc, mask_rows, sms, seed, drop_rows, 0,
        dropout_p, BLOCK_M, BLOCK_N, True, False, HAS_BIAS, False, DROPOUT, BLOCK_D != HEAD_DIM, UPCAST,
        PRECISION)

    full_hi, hi = _sequence_ranges(m0, shift, S, CAUSAL, BLOCK_M, BLOCK_N)
    k_base = K + b * skb + hkv * skh
    v_base = V + b * svb + hkv * svh
    k_tile = offs_n[:, None] * skn + offs_d[None, :] * skd
    v_tile = offs_n[:, None] * svn + offs_d[None, :] * svd
    dq = _dq_stage(
        dq, q, do, lse2, delta, k_base, v_base, skn, svn, k_tile, v_tile, 0, full_hi, S, offs_n, d_ok, qi, N,
        shift, scale_log2, bias_rows + P * sbc, sbc, mask_rows, sms, seed, drop_rows, P, dropout_p,
        BLOCK_M, BLOCK_N, False, False, HAS_BIAS, HAS_MASK, DROPOUT, BLOCK_D != HEAD_DIM, UPCAST, PRECISION)
    dq = _dq_stage(
        dq, q, do, lse2, delta, k_base, v_base, skn, svn, k_tile, v_tile, full_hi, hi, S, offs_n, d_ok, qi, N,
        shift, scale_log2, bias_rows + P * sbc, sbc, mask_rows, sms, seed, drop_rows, P, dropout_p,
        BLOCK_M, BLOCK_N, True, CAUSAL, HAS_BIAS, HAS_MASK, DROPOUT, BLOCK_D != HEAD_DIM, UPCAST, PRECISION)

    dq_ptrs = DQ + b * sdqb + h * sdqh + qi64 * sdqn + offs_d[None, :] * sdqd
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])


@triton.jit
def _dkdv_stage(dk, dv, k, v, q_base, do_base, sqn, sdon, q_tile, do_tile, lse2_base, delta_base, lo, hi, n_q,
                offs_m, d_ok, kj, n_keys, shift, scale_log2, bias_cols, sbn, mask_cols, smn, seed, row0,
                drop_cols, dropout_p,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, CHECK_D: tl.constexpr, UPCAST: tl.constexpr,
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
        q = _load_rows(q_base + start64 * sqn + q_tile, rows_ok, d_ok, True, CHECK_D)
        do = _load_rows(do_base + start64 * sdon + do_tile, rows_ok, d_ok, True, CHECK_D)
        lse2 = tl.load(lse2_base + rows, mask=rows_ok, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=rows_ok, other=0.0)
        zero = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        qk = _dot(k, tl.trans(q), zero, UPCAST, PRECISION)
        dp = _dot(v, tl.trans(do), zero, UPCAST, PRECISION)
        kept, ds = _grad_scores(qk, dp, lse2[None, :], delta[None, :], qi, kj, n_q, n_keys, shift, scale_log2,
                                bias_cols + qi64 * sbn, mask_cols + qi64 * smn, seed, row0 + qi64, drop_cols,
                                dropout_p,
                                False, CAUSAL, HAS_BIAS, HAS_MASK, DROPOUT)
        dv = _dot(kept.to(do.dtype), do, dv, UPCAST, PRECISION)
        dk = _dot(ds.to(q.dtype), q, dk, UPCAST, PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["seed", "TUNE_Q", "TUNE_KV"])
def _dkdv_kernel(Q, K, V, BIAS, MASK, DO, LSE2, DELTA, DK, DV,
                 sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                 sbb, sbh, sbn, sbc, smb, smh, smn, sms, sdob, sdoh, sdon, sdod,
                 sdkc, sdkh, sdkn, sdkd, sdvc, sdvh, sdvn, sdvd,
                 Hq, G, N, n_keys, col0, shift, pairs, per_chunk, scale, scale_log2, dropout_p, seed,
                 TUNE_Q, TUNE_KV,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """dK, dV of one segment (prefix or sequence) whose keys are columns col0 .. col0 + n_keys of the P + S.

    One program: BLOCK_N keys of one KV head, summed over the (row, query head) pairs of its chunk: pairs
    t in [chunk * per_chunk, (chunk + 1) * per_chunk), t = b * G + g over all B * G pairs. The program
    writes its sum to DK[chunk], DV[chunk]. For a per-row segment per_chunk = G, so chunk = b and DK is the
    gradient itself; for a shared prefix (batch stride 0) DK holds per-chunk partial sums, added up by the
    caller in a fixed order. No atomics: the result does not depend on scheduling.
    """
    pid_n = tl.program_id(0)
    hkv = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(2)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    keys_ok = offs_n < n_keys
    kj = offs_n[:, None]
    kj64 = kj.to(tl.int64)
    t_lo = chunk * per_chunk
    t_hi = tl.minimum(t_lo + per_chunk, pairs)
    b_kv = (t_lo // G).to(tl.int64)

    k = _load_rows(K + b_kv * skb + hkv * skh + kj64 * skn + offs_d[None, :] * skd, keys_ok, d_ok, True,
                   BLOCK_D != HEAD_DIM)
    v = _load_rows(V + b_kv * svb + hkv * svh + kj64 * svn + offs_d[None, :] * svd, keys_ok, d_ok, True,
                   BLOCK_D != HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_tile = offs_m[:, None] * sqn + offs_d[None, :] * sqd
    do_tile = offs_m[:, None] * sdon + offs_d[None, :] * sdod

    # Causal: query i sees key j iff i >= j - shift, so query blocks before m_lo see none of this key block.
    # The rest runs as one loop with the mask applied in every step: a second, unmasked copy of the loop for
    # the blocks below the diagonal (as the forward has) costs more registers than it saves.
    m_lo = 0
    if CAUSAL:
        m_lo = tl.maximum(n0 - shift, 0) // BLOCK_M * BLOCK_M
    for t in range(t_lo, t_hi):
        b = (t // G).to(tl.int64)
        h = hkv * G + t % G
        bh = b * Hq + h
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        bias_cols = BIAS + b * sbb + h * sbh + (col0 + kj64) * sbc
        mask_cols = MASK + b * smb + h * smh + kj64 * sms
        dk, dv = _dkdv_stage(
            dk, dv, k, v, q_base, do_base, sqn, sdon, q_tile, do_tile, LSE2 + bh * N, DELTA + bh * N,
            m_lo, N, N, offs_m, d_ok, kj, n_keys, shift, scale_log2, bias_cols, sbn,
            mask_cols, smn, seed, bh * N, col0 + kj, dropout_p,
            BLOCK_M, BLOCK_N, CAUSAL, HAS_BIAS, HAS_MASK, DROPOUT, BLOCK_D != HEAD_DIM, UPCAST, PRECISION)

    chunk64 = tl.cast(chunk, tl.int64)
    out_mask = keys_ok[:, None] & d_ok[None, :]
    dk_ptrs = DK + chunk64 * sdkc + hkv * sdkh + kj64 * sdkn + offs_d[None, :] * sdkd
    dv_ptrs = DV + chunk64 * sdvc + hkv * sdvh + kj64 * sdvn + offs_d[None, :] * sdvd
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _dbias_block(Q, DO, LSE2, DELTA, K, V, BIAS, MASK,
                 sqb, sqh, sqn, sqd, sdob, sdoh, sdon, sdod, skb, skh, skn, skd, svb, svh, svn, svd,
                 sbb, sbh, sbn, sbc, smb, smh, smn, sms,
                 start, n_keys, col0, bb, hb, r, u_lo, u_hi, units_h, units_m, Hq, G, N, shift,
                 scale_log2, seed, dropout_p,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
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
        q = _load_rows(Q + b * sqb + h * sqh + qi64 * sqn + offs_d[None, :] * sqd, rows_ok, d_ok, True,
                       BLOCK_D != HEAD_DIM)
        do = _load_rows(DO + b * sdob + h * sdoh + qi64 * sdon + offs_d[None, :] * sdod, rows_ok, d_ok, True,
                        BLOCK_D != HEAD_DIM)
        k = _load_rows(K + b * skb + hkv * skh + cols64 * skn + offs_d[None, :] * skd, cols < n_keys, d_ok, True,
                       BLOCK_D != HEAD_DIM)
        v = _load_rows(V + b * svb + hkv * svh + cols64 * svn + offs_d[None, :] * svd, cols < n_keys, d_ok, True,
                       BLOCK_D != HEAD_DIM)
        lse2 = tl.load(LSE2 + bh * N + rows, mask=rows_ok, other=float("inf"))
        delta = tl.load(DELTA + bh * N + rows, mask=rows_ok, other=0.0)
        zero = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        qk = _dot(q, tl.trans(k), zero, UPCAST, PRECISION)
        dp = _dot(do, tl.trans(v), zero, UPCAST, PRECISION)
        _, ds = _grad_scores(qk, dp, lse2[:, None], delta[:, None], qi, kj, N, n_keys, shift, scale_log2,
                             BIAS + b * sbb + h * sbh + qi64 * sbn + (col0 + kj64) * sbc,
                             MASK + b * smb + h * smh + qi64 * smn + kj64 * sms, seed, bh * N + qi64, col0 + kj,
                             dropout_p,
                             True, CAUSAL, True, HAS_MASK, DROPOUT)
        acc += ds
    return acc


@triton.jit(do_not_specialize=["seed"])
def _dbias_kernel(Q, K, V, PK, PV, BIAS, MASK, DO, LSE2, DELTA, DB,
                  sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                  spkb, spkh, spkn, spkd, spvb, spvh, spvn, spvd,
                  sbb, sbh, sbn, sbc, smb, smh, smn, sms, sdob, sdoh, sdon, sdod,
                  sdbc, sdbb, sdbh, sdbn, sdbj,
                  Hq, G, N, S, P, Hb, units_h, units_m, units, per_chunk, out_rows, chunks, scale_log2,
                  dropout_p, seed,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, SUM_COLS: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
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
    out_base = (DB + tl.cast(chunk, tl.int64) * sdbc + tl.cast(bb, tl.int64) * sdbb + tl.cast(hb, tl.int64) * sdbh
                + out_r.to(tl.int64) * sdbn)
    shift = S - N
    total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, P, BLOCK_N):
        ds = _dbias_block(Q, DO, LSE2, DELTA, PK, PV, BIAS, MASK,
                          sqb, sqh, sqn, sqd, sdob, sdoh, sdon, sdod, spkb, spkh, spkn, spkd,
                          spvb, spvh, spvn, spvd, sbb, sbh, sbn, sbc, smb, smh, smn, sms,
                          start, P, 0, bb, hb, r, u_lo, u_hi, units_h, units_m, Hq, G, N, shift,
                          scale_log2, seed, dropout_p,
                          HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, False, False, DROPOUT, UPCAST, PRECISION)
        if SUM_COLS:
            total += ds
        else:
            cols = start + offs_n
            tl.store(out_base[:, None] + cols[None, :] * sdbj, ds, mask=out_ok[:, None] & (cols < P)[None, :])
    for start in range(0, S, BLOCK_N):
        ds = _dbias_block(Q, DO, LSE2, DELTA, K, V, BIAS, MASK,
                          sqb, sqh, sqn, sqd, sdob, sdoh, sdon, sdod, skb, skh, skn, skd,
                          svb, svh, svn, svd, sbb, sbh, sbn, sbc, smb, smh, smn, sms,
                          start, S, P, bb, hb, r, u_lo, u_hi, units_h, units_m, Hq, G, N, shift,
                          scale_log2, seed, dropout_p,
                          HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, CAUSAL, HAS_MASK, DROPOUT, UPCAST, PRECISION)
        if SUM_COLS:
            total += ds
        else:
            cols = start + offs_n
            tl.store(out_base[:, None] + (P + cols)[None, :] * sdbj, ds,
                     mask=out_ok[:, None] & (cols < S)[None, :])
    if SUM_COLS:
        tl.store(out_base, tl.sum(total, 1), mask=out_ok)


# ----------------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------------

_TUNE_KEY = ["TUNE_Q", "TUNE_KV", "HEAD_DIM", "CAUSAL", "HAS_MASK", "HAS_BIAS", "DROPOUT"]
_INTERPRETER_BLOCK = 16
# Programs a partially reduced gradient aims for under the interpreter (no SMs to fill); a few, so that
# the chunked reduction runs in CPU tests too.
_INTERPRETER_PROGRAMS = 8


def _always(arch, block_d, features):
    return True


# Autotune candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages) -> where the config compiles without
# spilling registers, as a predicate of (compute capability as 80/90, BLOCK_D, features in use among
# {"mask", "bias", "dropout"}). Calibrated with `python -m fastprefix.kernels.report` (sm_80 and sm_90,
# D = 64 and 128, fp16 and bf16; the BLOCK_D = 256 conditions from a one-off run of the same report at
# D = 256). The pruner also drops configs whose fp32 accumulators exceed 64 registers per thread. In the
# dK/dV kernel BLOCK_N is the keys of a program, BLOCK_M the queries per step.
FWD_CANDIDATES = {
    (128, 64, 8, 3): lambda arch, block_d, features: not features and (arch >= 90 or block_d <= 64),
    (128, 32, 8, 3): _always,
    (64, 64, 8, 3): lambda arch, block_d, features: block_d <= 128,
    (16, 64, 4, 3): _always,
}
DQ_CANDIDATES = {
    (128, 32, 8, 2): lambda arch, block_d, features: len(features) < 3 or (arch >= 90 and block_d <= 64),
    (64, 32, 8, 2): lambda arch, block_d, features: block_d <= 128 or arch < 90,
    (16, 32, 4, 2): _always,
}
DKDV_CANDIDATES = {
    (32, 64, 8, 2): lambda arch, block_d, features: not {"bias", "dropout"} <= features,
    (16, 64, 8, 2): lambda arch, block_d, features: not {"bias", "dropout"} <= features or arch < 90 or block_d <= 64,
    (16, 32, 4, 2): _always,
    # Only where four warps cannot hold the accumulators (BLOCK_D = 256); not covered by the report.
    (16, 32, 8, 2): lambda arch, block_d, features: block_d > 128,
}
# The dBias kernel (gradient of a broadcast bias; not tuned): BLOCK_M, BLOCK_N, num_warps, num_stages.
DBIAS_LAUNCH = (_INTERPRETER_BLOCK, _INTERPRETER_BLOCK, 4, 1) if INTERPRETED else (64, 32, 8, 2)


def config_fits(candidates, acc_tile, accumulators, resident, config, *, arch, n_q, n_kv, block_d, features,
                itemsize=2, smem_bytes=None, small_q_tiles=False) -> bool:
    """Whether the launcher may use `config` (BLOCK_M, BLOCK_N, num_warps, num_stages) of `candidates`:
    its query block fits the queries (BLOCK_M = 16 only for N <= 16, decoding, unless the kernel steps over
    queries or `small_q_tiles`), its key block the keys, its fp32 accumulators (`accumulators` tiles of
    `acc_tile` rows x BLOCK_D) 64 registers per thread, it is spill-free for this arch, BLOCK_D and feature
    set, and (when `smem_bytes` is given) its tiles fit in shared memory: `resident` [acc rows, BLOCK_D]
    tiles loaded once plus two [other rows, BLOCK_D] tiles per pipeline stage, of `itemsize` bytes (the
    estimate matches the compiler's figure for the forward on sm_90 and exceeds it on sm_80)."""
    m, n, warps, stages = config
    rows, other = (m, n) if acc_tile == "BLOCK_M" else (n, m)
    decode_only = acc_tile == "BLOCK_M" and m == 16 and not small_q_tiles
    smem = (resident * rows + 2 * stages * other) * block_d * itemsize
    return (m <= max(16, n_q) and (not decode_only or n_q <= 16) and n <= max(16, n_kv)
            and accumulators * rows * block_d <= 64 * 32 * warps
            and (smem_bytes is None or smem <= smem_bytes)
            and candidates[config](arch, block_d, features))


def _features(kwargs) -> frozenset:
    return frozenset(name for name, flag in (("mask", "HAS_MASK"), ("bias", "HAS_BIAS"), ("dropout", "DROPOUT"))
                     if kwargs[flag])


def _pruner(candidates, acc_tile, accumulators, resident):
    """early_config_prune for Triton's autotuner over `candidates` (see `config_fits`)."""

    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        major, minor = torch.cuda.get_device_capability(q.device)
        smem_bytes = torch.cuda.get_device_properties(q.device).shared_memory_per_block_optin
        for small_q_tiles in (False, True):  # 16-row query tiles for long sequences only if nothing else fits
            fits = [c for c in configs if config_fits(
                candidates, acc_tile, accumulators, resident,
                (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages), arch=10 * major + minor,
                n_q=kwargs["TUNE_Q"], n_kv=kwargs["TUNE_KV"], block_d=kwargs["BLOCK_D"],
                features=_features(kwargs), itemsize=q.element_size(), smem_bytes=smem_bytes,
                small_q_tiles=small_q_tiles)]
            if fits:
                return fits
        # Nothing is known to fit (fp32 with large heads, say): the smallest tiles, unpipelined.
        smallest = min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])
        return [triton.Config(dict(smallest.kwargs), num_warps=smallest.num_warps, num_stages=1)]

    return prune


def _configs(candidates):
    """Autotune configs; a single small one in the interpreter (no timing there, and every extra config
    would be a slow extra run)."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": _INTERPRETER_BLOCK, "BLOCK_N": _INTERPRETER_BLOCK})]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in candidates]


TUNED = {  # name: (kernel, candidates, accumulator rows, [rows, BLOCK_D] fp32 accumulators, tiles loaded once)
    "fwd": (_fwd_kernel, FWD_CANDIDATES, "BLOCK_M", 1, 1),
    "dq": (_dq_kernel, DQ_CANDIDATES, "BLOCK_M", 1, 2),
    "dkdv": (_dkdv_kernel, DKDV_CANDIDATES, "BLOCK_N", 2, 2),
}
_DKDV_MAX_BLOCK_N = max(n for _, n, _, _ in DKDV_CANDIDATES)


def _autotuned(name):
    kernel, candidates, acc_tile, accumulators, resident = TUNED[name]
    prune = _pruner(candidates, acc_tile, accumulators, resident)
    return triton.autotune(_configs(candidates), key=_TUNE_KEY, prune_configs_by={"early_config_prune": prune})(
        kernel)


_fwd, _dq, _dkdv = _autotuned("fwd"), _autotuned("dq"), _autotuned("dkdv")


def preprocess_block(block_d: int) -> int:
    """Query rows per program of the backward preprocess (a memory-bound row reduction)."""
    return max(16, 4096 // block_d)


def _target_programs(device: torch.device) -> int:
    """How many programs a launch should have in flight to fill the device."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_PROGRAMS


def _chunks(units: int, programs: int, device: torch.device) -> tuple[int, int]:
    """Split `units` of work among chunks so that programs * chunks reaches the device's target.
    Returns (number of chunks, units per chunk); the last chunk may hold fewer."""
    chunks = max(1, min(units, triton.cdiv(_target_programs(device), programs)))
    per_chunk = triton.cdiv(units, chunks)
    return triton.cdiv(units, per_chunk), per_chunk


def _prefix_strides(t: torch.Tensor) -> tuple[int, ...]:
    """[B, Hkv, P, D] strides of a prefix; batch stride 0 for a shared [Hkv, P, D] prefix."""
    return (0, *t.stride()) if t.dim() == 3 else t.stride()


def _broadcast(t: torch.Tensor | None, shape: tuple[int, ...], dummy: torch.Tensor):
    """(tensor, 4 strides) reading `t` as broadcast to `shape`: stride 0 along broadcast dimensions, no copy.
    A bool tensor is read as uint8. Without `t`: `dummy` and zero strides (never dereferenced)."""
    if t is None:
        return dummy, (0, 0, 0, 0)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return t, t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)).expand(shape).stride()


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _compile_options(q: torch.Tensor) -> dict:
    """Constexprs shared by all kernels: head dim, its power-of-two block, dot operand handling."""
    D = q.shape[-1]
    return dict(
        HEAD_DIM=D,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


# ----------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------


def attention_forward(q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, *, causal: bool, scale: float,
                      dropout_p: float, seed: int):
    """Attention of q over [prefix ; sequence] keys.

    Args:
        q: [B, Hq, N, D]; k, v: [B, Hkv, S, D]; prefix_k, prefix_v: [Hkv, P, D] shared or [B, Hkv, P, D].
            Any strides; fp16, bf16 or fp32; D <= MAX_HEAD_DIM.
        attn_mask: None or bool broadcastable to [B, Hq, N, S] (True = visible).
        attn_bias: None or a tensor of q's dtype broadcastable to [B, Hq, N, P + S].
        causal: bottom-right causal mask on the sequence keys.
        scale: score scale. dropout_p: probability dropout; `seed` fixes its mask.

    Returns:
        out [B, Hq, N, D] (contiguous, q.dtype) and lse [B, Hq, N] float32 (natural log; -inf and out = 0
        for rows that see no key).
    """
    B, Hq, N, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], prefix_k.shape[-2]
    out = torch.empty((B, Hq, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, N), dtype=torch.float32, device=q.device)
    bias, bias_strides = _broadcast(attn_bias, (B, Hq, N, P + S), q)
    mask, mask_strides = _broadcast(attn_mask, (B, Hq, N, S), q)
    with _device_guard(q):
        _fwd[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), Hq, B)](
            q, k, v, prefix_k, prefix_v, bias, mask, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
            *bias_strides, *mask_strides, *out.stride(),
            Hq, Hq // Hkv, N, S, P, scale * 1.4426950408889634, dropout_p, seed,
            TUNE_Q=triton.next_power_of_2(N), TUNE_KV=triton.next_power_of_2(P + S),
            CAUSAL=causal, HAS_MASK=attn_mask is not None, HAS_BIAS=attn_bias is not None,
            DROPOUT=dropout_p > 0, **_compile_options(q))
    return out, lse


def attention_backward(dout, q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, out, lse, *, causal: bool,
                       scale: float, dropout_p: float, seed: int, bias_grad: bool):
    """Gradients of `attention_forward` given dout [B, Hq, N, D] and the forward's out and lse.

    Same arguments as `attention_forward` (the same `seed` regenerates the dropout mask). Returns
    (dq, dk, dv, dprefix_k, dprefix_v, dbias): gradients shaped like their inputs in q.dtype (a shared
    prefix's gradient summed over rows and query heads), dbias shaped like attn_bias when `bias_grad`,
    else None. Deterministic: no atomics; partial sums are added in a fixed order.
    """
    B, Hq, N, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], prefix_k.shape[-2]
    G = Hq // Hkv
    opts = _compile_options(q)
    scale_log2 = scale * 1.4426950408889634
    features = dict(HAS_BIAS=attn_bias is not None, DROPOUT=dropout_p > 0)
    tune = dict(TUNE_Q=triton.next_power_of_2(N))
    bias, bias_strides = _broadcast(attn_bias, (B, Hq, N, P + S), q)
    mask, mask_strides = _broadcast(attn_mask, (B, Hq, N, S), q)
    delta = torch.empty((B, Hq, N), dtype=torch.float32, device=q.device)
    lse2 = torch.empty((B, Hq, N), dtype=torch.float32, device=q.device)
    dq = torch.empty((B, Hq, N, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, Hkv, S, D), dtype=q.dtype, device=q.device)
    dv = torch.empty((B, Hkv, S, D), dtype=q.dtype, device=q.device)
    with _device_guard(q):
        block = preprocess_block(opts["BLOCK_D"])
        _bwd_preprocess_kernel[(triton.cdiv(N, block), Hq, B)](
            out, dout, lse, delta, lse2, *out.stride(), *dout.stride(), Hq, N,
            HEAD_DIM=opts["HEAD_DIM"], BLOCK_D=opts["BLOCK_D"], BLOCK_M=block)
        _dq[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), Hq, B)](
            q, k, v, prefix_k, prefix_v, bias, mask, dout, lse2, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
            *bias_strides, *mask_strides, *dout.stride(), *dq.stride(),
            Hq, G, N, S, P, scale, scale_log2, dropout_p, seed, TUNE_KV=triton.next_power_of_2(P + S),
            CAUSAL=causal, HAS_MASK=attn_mask is not None, **features, **tune, **opts)

        def segment_grads(seg_k, seg_v, seg_strides, n_keys, col0, dk_out, dv_out, chunks, per_chunk, seg_causal,
                          seg_mask):
            _dkdv[lambda meta: (triton.cdiv(n_keys, meta["BLOCK_N"]), Hkv, chunks)](
                q, seg_k, seg_v, bias, mask, dout, lse2, delta, dk_out, dv_out,
                *q.stride(), *seg_strides[0], *seg_strides[1], *bias_strides, *mask_strides, *dout.stride(),
                *dk_out.stride(), *dv_out.stride(),
                Hq, G, N, n_keys, col0, S - N, B * G, per_chunk, scale, scale_log2, dropout_p, seed,
                TUNE_KV=triton.next_power_of_2(n_keys), CAUSAL=seg_causal, HAS_MASK=seg_mask, **features,
                **tune, **opts)

        if S:
            segment_grads(k, v, (k.stride(), v.stride()), S, P, dk, dv, B, G, causal, attn_mask is not None)
        prefix_strides = (_prefix_strides(prefix_k), _prefix_strides(prefix_v))
        if P and prefix_k.dim() == 3:
            chunks, per_chunk = _chunks(B * G, Hkv * triton.cdiv(P, _DKDV_MAX_BLOCK_N), q.device)
            parts = torch.empty((2, chunks, Hkv, P, D), dtype=torch.float32, device=q.device)
            segment_grads(prefix_k, prefix_v, prefix_strides, P, 0, parts[0], parts[1], chunks, per_chunk,
                          False, False)
            dpk, dpv = parts.sum(1).to(q.dtype)
        else:
            dpk = torch.empty(prefix_k.shape, dtype=q.dtype, device=q.device)
            dpv = torch.empty(prefix_v.shape, dtype=q.dtype, device=q.device)
            if P:
                segment_grads(prefix_k, prefix_v, prefix_strides, P, 0, dpk, dpv, B, G, False, False)
        dbias = None
        if bias_grad:
            dbias = _bias_grad(q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, mask, mask_strides, dout, lse2,
                               delta, causal=causal, scale_log2=scale_log2, dropout_p=dropout_p, seed=seed,
                               opts=opts)
    return dq, dk, dv, dpk, dpv, dbias


def _bias_grad(q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, mask, mask_strides, dout, lse2, delta, *,
               causal, scale_log2, dropout_p, seed, opts):
    """Gradient of attn_bias: dScores summed over the dimensions it is broadcast along (see `_dbias_kernel`)."""
    B, Hq, N, D = q.shape
    Hkv, S, P = k.shape[1], k.shape[2], prefix_k.shape[-2]
    bias4 = attn_bias.reshape((1,) * (4 - attn_bias.dim()) + tuple(attn_bias.shape))
    Bb, Hb, Nb, Cb = bias4.shape
    if bias4.numel() == 0:
        return torch.zeros_like(attn_bias)
    block, block_n, num_warps, num_stages = DBIAS_LAUNCH
    rows_broadcast = Nb == 1 and N > 1
    units_m = triton.cdiv(N, block) if rows_broadcast else 1
    row_programs = 1 if rows_broadcast else triton.cdiv(N, block)
    out_rows = block if rows_broadcast else N
    sum_cols = Cb == 1 and P + S > 1
    units_b = B if Bb == 1 else 1
    units_h = Hq if Hb == 1 else 1
    units = units_b * units_h * units_m
    chunks, per_chunk = _chunks(units, row_programs * Bb * Hb, q.device)
    parts = torch.empty((chunks, Bb, Hb, out_rows, 1 if sum_cols else P + S), dtype=torch.float32,
                        device=q.device)
    bias_strides = bias4.expand(B, Hq, N, P + S).stride()
    _dbias_kernel[(row_programs, Hb, Bb * chunks)](
        q, k, v, prefix_k, prefix_v, attn_bias, mask, dout, lse2, delta, parts,
        *q.stride(), *k.stride(), *v.stride(), *_prefix_strides(prefix_k), *_prefix_strides(prefix_v),
        *bias_strides, *mask_strides, *dout.stride(), *parts.stride(),
        Hq, Hq // Hkv, N, S, P, Hb, units_h, units_m, units, per_chunk, out_rows, chunks, scale_log2,
        dropout_p, seed,
        BLOCK_M=block, BLOCK_N=block_n, CAUSAL=causal, HAS_MASK=attn_mask is not None, DROPOUT=dropout_p > 0,
        SUM_COLS=sum_cols, num_warps=num_warps, num_stages=num_stages, **opts)
    grad = parts.sum(0)
    if rows_broadcast:
        grad = grad.sum(2, keepdim=True)
    return grad.to(attn_bias.dtype).reshape(attn_bias.shape)
