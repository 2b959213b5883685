"""Triton decode kernels: attention of a few queries per row over [prefix ; sequence], forward only (inference;
training keeps the general kernels of `forward.py` and `backward.py`). fastprefix's dispatcher sends them
calls of at most 16 queries per row and head dims of at most 128 (the compile report covers D <= 128).

Supported: what the general forward supports except dropout (inference draws none): q [B, Hq, N, D];
k, v [B, Hkv, S, D]; prefix [Hkv, P, D] shared or [B, Hkv, P, D] per row; GQA/MQA; bottom-right causal
masking of the sequence keys; a bool mask over the sequence keys and a float bias over all P + S columns,
read through broadcast strides; fp16, bf16, fp32; any strides; P = 0, S = 0.

The work is split into parts, each an exact softmax over a disjoint range of key columns, written as fp32
partials (out normalized, lse in log2 units), then merged by log-sum-exp (docs/design.md, "The math"):

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

from .bank import ENTRY_FIELDS, BankTable, entry_tiles
from .common import (INTERPRETED, INTERPRETER_BLOCK, LN2, LOG2E_VALUE, broadcast_operand, chunks, compile_options,
                     device_guard, fwd_stage, load_rows, strides)
from .tuning import DECODE, MERGE_WARPS, decode_preference, features_of, fixed_launch, preprocess_block

_MIN_SPLIT_BLOCKS = 4
"""Fewest key blocks per split: a split writes a [rows, D] fp32 partial and reads 2 x [keys, D] K/V, so
splitting finer than a few blocks (256 keys at BLOCK_N = 64) spends more bandwidth on partials than on keys."""


@triton.jit
def _store_part(acc, l_i, m_i, PART_O, PART_L, part, out_rows, rows_ok, offs_d, d_ok, stride_pop, stride_por,
                stride_pod, stride_plp):
    """Write one part of BLOCK_M rows: out normalized (0 where the row saw no key), lse in log2 units
    (-inf where the row saw no key)."""
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    lse2 = tl.where(seen, m_i + tl.math.log2(l_safe), float("-inf"))
    part64 = tl.cast(part, tl.int64)
    o_ptrs = PART_O + part64 * stride_pop + out_rows[:, None] * stride_por + offs_d[None, :] * stride_pod
    tl.store(o_ptrs, acc / l_safe[:, None], mask=rows_ok[:, None] & d_ok[None, :])
    tl.store(PART_L + part64 * stride_plp + out_rows, lse2, mask=rows_ok)


@triton.jit
def _decode_prefix_kernel(Q, PK, PV, ENTRIES, ORDER, STARTS, BIAS, PART_O, PART_L,
                          stride_qb, stride_qh, stride_qn, stride_qd, stride_pkh, stride_pkn, stride_pkd,
                          stride_pvh, stride_pvn, stride_pvd, stride_bb, stride_bh, stride_bn, stride_bj,
                          stride_pop, stride_por, stride_pod, stride_plp,
                          Hq, G, N, P, n_rows, tiles, per_split, part0, scale_log2,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
                          PRECISION: tl.constexpr, BANK: tl.constexpr, ALIGN: tl.constexpr):
    """Shared prefix [Hkv, P, D]: one program = stacked query rows [pid0 * BLOCK_M, + BLOCK_M) of KV head
    pid1 (row r = (b * G + g) * N + i of the n_rows = B * G * N that read it) against prefix keys
    [pid2 * per_split, + per_split). Writes part part0 + pid2 of every one of its rows.

    BANK: each entry of a prefix bank is such a shared prefix to the rows that read it. pid0 = entry * tiles +
    tile: the stacked rows [tile * BLOCK_M, + BLOCK_M) of the rows order[starts[entry]:starts[entry + 1]]
    (`BankTable.groups`) against the entry's keys; a tile past the entry's rows reads no key and writes nothing.
    """
    hkv = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lo = split * per_split
    if BANK:
        entry = tl.program_id(0) // tiles
        first = tl.load(STARTS + entry)
        entry_rows = (tl.load(STARTS + entry + 1) - first) * G * N
        r = tl.program_id(0) % tiles * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_ok = r < entry_rows
        b = tl.load(ORDER + first + r // (G * N), mask=rows_ok, other=0)
        k_base, v_base, k_tile, v_tile, stride_kn, stride_vn, n_keys = entry_tiles(
            PK, PV, ENTRIES + tl.cast(entry, tl.int64) * ENTRY_FIELDS, hkv, stride_pkd, stride_pvd, offs_n, offs_d,
            ALIGN=ALIGN)
        hi = tl.where(entry_rows > tl.program_id(0) % tiles * BLOCK_M, tl.minimum(lo + per_split, n_keys), lo)
    else:
        r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_ok = r < n_rows
        b = (r // (G * N)).to(tl.int64)
        k_base, v_base = PK + hkv * stride_pkh, PV + hkv * stride_pvh
        k_tile = offs_n[:, None] * stride_pkn + offs_d[None, :] * stride_pkd
        v_tile = offs_n[:, None] * stride_pvn + offs_d[None, :] * stride_pvd
        stride_kn, stride_vn = stride_pkn, stride_pvn
        hi = tl.minimum(lo + per_split, P)
    g = (r // N) % G
    i = (r % N).to(tl.int64)
    h = hkv * G + g

    q = load_rows(Q + b[:, None] * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qn
                  + offs_d[None, :] * stride_qd, rows_ok, d_ok, CHECK_ROWS=True, EVEN_D=EVEN_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    bias_rows = BIAS + (b * stride_bb + h * stride_bh + i * stride_bn)[:, None]
    acc, l_i, m_i = fwd_stage(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, k_tile, v_tile, lo, hi, hi, offs_n, d_ok, r[:, None],
        n_rows, 0, scale_log2, bias_rows, stride_bj, BIAS, 0, 0, 0, 0, 0.0,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BOUNDS=True, CAUSAL=False, HAS_BIAS=HAS_BIAS, HAS_MASK=False,
        DROPOUT=False, EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION)
    out_rows = (b * Hq + h) * N + i
    _store_part(acc, l_i, m_i, PART_O, PART_L, part0 + split, out_rows, rows_ok, offs_d, d_ok, stride_pop,
                stride_por, stride_pod, stride_plp)


@triton.jit
def _decode_rows_kernel(Q, K, V, BIAS, MASK, PART_O, PART_L,
                        stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_vb, stride_vh, stride_vn, stride_vd, stride_bb, stride_bh, stride_bn, stride_bj,
                        stride_mb, stride_mh, stride_mn, stride_mj, stride_pop, stride_por, stride_pod, stride_plp,
                        Hkv, G, N, n_keys, col0, shift, per_split, part0, scale_log2,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
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

    q = load_rows(Q + b * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                  rows_ok, d_ok, CHECK_ROWS=True, EVEN_D=EVEN_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_keys)
    # Rows past the group get query index N: out of range, so no bias or mask element is read for them.
    qi = tl.where(rows_ok, i, N)[:, None]
    bias_rows = BIAS + (b * stride_bb + h * stride_bh + i * stride_bn)[:, None] + tl.cast(col0, tl.int64) * stride_bj
    mask_rows = MASK + (b * stride_mb + h * stride_mh + i * stride_mn)[:, None]
    acc, l_i, m_i = fwd_stage(
        acc, l_i, m_i, q, K + b * stride_kb + hkv * stride_kh, V + b * stride_vb + hkv * stride_vh, stride_kn,
        stride_vn, offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        lo, hi, hi, offs_n, d_ok, qi, N, shift, scale_log2, bias_rows, stride_bj, mask_rows, stride_mj, 0, 0, 0, 0.0,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BOUNDS=True, CAUSAL=CAUSAL, HAS_BIAS=HAS_BIAS, HAS_MASK=HAS_MASK,
        DROPOUT=False, EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION)
    out_rows = ((b * Hkv + hkv) * G + g) * N + i
    _store_part(acc, l_i, m_i, PART_O, PART_L, part0 + split, out_rows, rows_ok, offs_d, d_ok, stride_pop,
                stride_por, stride_pod, stride_plp)


@triton.jit
def _decode_merge_kernel(PART_O, PART_L, OUT, LSE, stride_pop, stride_por, stride_pod, stride_plp, stride_or,
                         stride_od, n_rows, n_parts,
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
        lse2 = tl.load(PART_L + part64 * stride_plp + rows64, mask=rows_ok, other=float("-inf"))
        o = tl.load(PART_O + part64 * stride_pop + rows64[:, None] * stride_por + offs_d[None, :] * stride_pod,
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
    lse = tl.where(seen, (m + tl.math.log2(t_safe)) * LN2, float("-inf"))
    o_ptrs = OUT + rows64[:, None] * stride_or + offs_d[None, :] * stride_od
    tl.store(o_ptrs, (acc / t_safe[:, None]).to(OUT.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])
    tl.store(LSE + rows64, lse, mask=rows_ok)


def splits(n_keys: int, block_n: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, keys per split) of `n_keys` keys for a launch of `programs` programs per split:
    enough splits for the device's target of programs in flight, each a whole number of key blocks and at
    least _MIN_SPLIT_BLOCKS of them (or all keys). No split is empty; the last may be shorter."""
    blocks = triton.cdiv(n_keys, block_n)
    count, per_split = chunks(triton.cdiv(blocks, _MIN_SPLIT_BLOCKS), programs, device)
    per_split = min(per_split * _MIN_SPLIT_BLOCKS, blocks) * block_n
    return triton.cdiv(n_keys, per_split), per_split


def _segments(q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, causal, opts, bank):
    """The key segments of a decode call with their launches, and the number of parts they write:
    [(kernel, keys, values, n_keys, first column, causal, masked, LaunchConfig, splits, keys per split,
    first part)]. A shared prefix (and each entry of a bank, to its rows) goes through the stacked-query kernel,
    per-row keys (a per-row prefix, the cache) through the split-KV kernel."""
    B, Hq, N, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = prefix_k.shape[-2] if bank is None else bank.max_p
    G = Hq // Hkv
    segments = []
    if bank is not None and P:
        segments.append(("bank", bank.keys, bank.values, P, 0, False, False))
    elif P:
        segments.append(("prefix" if prefix_k.dim() == 3 else "rows", prefix_k, prefix_v, P, 0, False, False))
    if S:
        segments.append(("rows", k, v, S, P, causal, attn_mask is not None))
    gathers = attn_mask is not None or attn_bias is not None
    launches, n_parts = [], 0
    for kind, seg_k, seg_v, n_keys, col0, seg_causal, seg_mask in segments:
        tile_rows = B * G * N if kind != "rows" else G * N
        features = features_of(dict(HAS_MASK=seg_mask, HAS_BIAS=attn_bias is not None))
        config = fixed_launch(DECODE, decode_preference("rows" if kind == "rows" else "prefix", tile_rows, gathers), q,
                              block_d=opts["BLOCK_D"], features=features)
        programs = triton.cdiv(tile_rows, config.block_m) * Hkv * (B if kind == "rows" else 1)
        if kind == "bank":  # the entries share the B * G * N rows: up to one more tile per entry
            programs += len(bank.lengths) * Hkv
        count, per_split = splits(n_keys, config.block_n, programs, q.device)
        launches.append((kind, seg_k, seg_v, n_keys, col0, seg_causal, seg_mask, config, count, per_split, n_parts))
        n_parts += count
    return launches, n_parts


def decode_forward(q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, *, causal: bool, scale: float,
                   bank: BankTable | None = None):
    """Attention of a few queries per row over [prefix ; sequence] keys, forward only.

    Args:
        q: [B, Hq, N, D], a few queries per row; k, v: [B, Hkv, S, D]; prefix_k, prefix_v: [Hkv, P, D] shared
            or [B, Hkv, P, D] per row. Any strides; fp16, bf16 or fp32; D <= 128.
        attn_mask: None or bool broadcastable to [B, Hq, N, S] (True = visible).
        attn_bias: None or a tensor of q's dtype broadcastable to [B, Hq, N, P + S].
        causal: bottom-right causal mask on the sequence keys (query i sees key j iff j <= i + S - N).
        scale: score scale.
        bank: row b's prefix is entry bank.index[b] of a prefix bank (prefix_k, prefix_v are None then).

    Returns:
        out [B, Hq, N, D] (contiguous, q.dtype) and lse [B, Hq, N] float32 (natural log; -inf and out = 0
        for rows that see no key): the same as `attention_forward` without dropout, within rounding.
    """
    B, Hq, N, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    P = prefix_k.shape[-2] if bank is None else bank.max_p
    opts = compile_options(q)
    bias, bias_strides = broadcast_operand(attn_bias, (B, Hq, N, P + S), q, "b")
    mask, mask_strides = broadcast_operand(attn_mask, (B, Hq, N, S), q, "m")
    n_rows = B * Hq * N
    launches, n_parts = _segments(q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, causal, opts, bank)
    out = torch.empty((B, Hq, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, N), dtype=torch.float32, device=q.device)
    part_o = torch.empty((n_parts, n_rows, D), dtype=torch.float32, device=q.device)
    part_l = torch.empty((n_parts, n_rows), dtype=torch.float32, device=q.device)
    parts = dict(**strides("po", part_o, "prd"), stride_plp=part_l.stride(0))
    common = dict(**strides("q", q), **bias_strides, **parts, G=Hq // Hkv, N=N, scale_log2=scale * LOG2E_VALUE,
                  HAS_BIAS=attn_bias is not None, **opts)
    with device_guard(q):
        for kind, seg_k, seg_v, n_keys, col0, seg_causal, seg_mask, config, count, per_split, part0 in launches:
            launch = dict(per_split=per_split, part0=part0, **config.launch_options(), **common)
            if kind == "prefix":
                _decode_prefix_kernel[(triton.cdiv(B * Hq // Hkv * N, config.block_m), Hkv, count)](
                    q, seg_k, seg_v, q, q, q, bias, part_o, part_l, **strides("pk", seg_k, "hnd"),
                    **strides("pv", seg_v, "hnd"), Hq=Hq, P=n_keys, n_rows=B * Hq // Hkv * N, tiles=1, BANK=False,
                    ALIGN=1, **launch)
            elif kind == "bank":
                tiles = triton.cdiv(B * Hq // Hkv * N, config.block_m)
                _decode_prefix_kernel[(len(bank.lengths) * tiles, Hkv, count)](
                    q, seg_k, seg_v, bank.entries, *bank.groups(), bias, part_o, part_l, stride_pkh=0, stride_pkn=0,
                    stride_pkd=1, stride_pvh=0, stride_pvn=0, stride_pvd=1, Hq=Hq, P=n_keys, n_rows=B * Hq // Hkv * N,
                    tiles=tiles, BANK=True, ALIGN=bank.align, **launch)
            else:
                _decode_rows_kernel[(B * Hkv, triton.cdiv(Hq // Hkv * N, config.block_m), count)](
                    q, seg_k, seg_v, bias, mask, part_o, part_l, **strides("k", seg_k), **strides("v", seg_v),
                    **mask_strides, Hkv=Hkv, n_keys=n_keys, col0=col0, shift=S - N, CAUSAL=seg_causal,
                    HAS_MASK=seg_mask, **launch)
        block = INTERPRETER_BLOCK if INTERPRETED else preprocess_block(opts["BLOCK_D"])
        _decode_merge_kernel[(triton.cdiv(n_rows, block),)](
            part_o, part_l, out, lse, **parts, stride_or=D, stride_od=1, n_rows=n_rows, n_parts=n_parts,
            HEAD_DIM=opts["HEAD_DIM"], BLOCK_D=opts["BLOCK_D"], BLOCK_M=block, num_warps=MERGE_WARPS)
    return out, lse
