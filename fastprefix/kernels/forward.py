"""The forward kernel: attention over the keys [prefix ; sequence] without concatenating them, and its launcher.

Supported: q [B, Hq, N, D]; sequence k, v [B, Hkv, S, D]; prefix k, v [B, Hkv, P, D] (batch stride 0 for a
prefix shared by every row); GQA/MQA (query head h reads KV head h // (Hq // Hkv)); bottom-right causal
masking of the sequence keys (query i sees key j iff j <= i + S - N; prefix keys are always visible); a
bool mask over the sequence keys and a float bias over all P + S columns, both read through broadcast
strides (stride 0, never expanded in memory); dropout on the probabilities (Philox, keyed by seed and
element position, so backward regenerates the forward's mask); head dims up to 256 (padded to a power of
two with masked loads); fp16, bf16, fp32 (fp32 dots in IEEE fp32); any strides; P = 0 and S = 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .bank import BankTable, prefix_args, prefix_tiles
from .common import (LN2, LOG2E_VALUE, broadcast_operand, compile_options, device_guard, fwd_stage, kv_tiles,
                     load_rows, query_tile, sequence_ranges, strides)
from .tuning import FWD, autotuned


@triton.jit(do_not_specialize=["seed", "TUNE_Q", "TUNE_KV"])
def _fwd_kernel(Q, K, V, PK, PV, ENTRIES, INDEX, BIAS, MASK, OUT, LSE,
                stride_qb, stride_qh, stride_qn, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                stride_vb, stride_vh, stride_vn, stride_vd,
                stride_pkb, stride_pkh, stride_pkn, stride_pkd, stride_pvb, stride_pvh, stride_pvn, stride_pvd,
                stride_bb, stride_bh, stride_bn, stride_bj, stride_mb, stride_mh, stride_mn, stride_mj,
                stride_ob, stride_oh, stride_on, stride_od,
                Hq, G, N, S, P, scale_log2, dropout_p, seed, TUNE_Q, TUNE_KV,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, BANK: tl.constexpr,
                ALIGN: tl.constexpr):
    """One program: BLOCK_M query rows of one (row b, query head h). Writes out and lse (natural log). BANK: the
    prefix of row b is bank entry INDEX[b] (`prefix_tiles`); P, the longest entry's, numbers the sequence's
    columns."""
    bh, b, h, hkv, m0, offs_m, offs_n, offs_d, d_ok, rows_ok, qi, qi64 = query_tile(
        Hq, G, N, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, HEAD_DIM=HEAD_DIM)

    q = load_rows(Q + b * stride_qb + h * stride_qh + qi64 * stride_qn + offs_d[None, :] * stride_qd, rows_ok, d_ok,
                  CHECK_ROWS=True, EVEN_D=EVEN_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    bias_rows = BIAS + b * stride_bb + h * stride_bh + qi64 * stride_bn
    mask_rows = MASK + b * stride_mb + h * stride_mh + qi64 * stride_mn
    drop_rows = bh.to(tl.int64) * N + qi64
    shift = S - N

    pk_base, pv_base, pk_tile, pv_tile, pk_row, pv_row, p_row = prefix_tiles(
        PK, PV, ENTRIES, INDEX, b, hkv, stride_pkb, stride_pkh, stride_pkn, stride_pkd, stride_pvb, stride_pvh,
        stride_pvn, stride_pvd, P, offs_n, offs_d, BANK=BANK, ALIGN=ALIGN)
    acc, l_i, m_i = fwd_stage(
        acc, l_i, m_i, q, pk_base, pv_base, pk_row, pv_row, pk_tile, pv_tile, 0, p_row, p_row, offs_n, d_ok, qi, N,
        shift, scale_log2, bias_rows, stride_bj, mask_rows, stride_mj, seed, drop_rows, 0, dropout_p,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BOUNDS=True, CAUSAL=False, HAS_BIAS=HAS_BIAS, HAS_MASK=False,
        DROPOUT=DROPOUT, EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION)

    full_hi, hi = sequence_ranges(m0, shift, S, CAUSAL=CAUSAL, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    seq_bias_rows = bias_rows + tl.cast(P, tl.int64) * stride_bj
    k_base, v_base, k_tile, v_tile = kv_tiles(K, V, b, hkv, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb,
                                              stride_vh, stride_vn, stride_vd, offs_n, offs_d)
    acc, l_i, m_i = fwd_stage(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, k_tile, v_tile, 0, full_hi, S, offs_n, d_ok, qi, N,
        shift, scale_log2, seq_bias_rows, stride_bj, mask_rows, stride_mj, seed, drop_rows, P, dropout_p,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BOUNDS=False, CAUSAL=False, HAS_BIAS=HAS_BIAS, HAS_MASK=HAS_MASK,
        DROPOUT=DROPOUT, EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION)
    acc, l_i, m_i = fwd_stage(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, k_tile, v_tile, full_hi, hi, S, offs_n, d_ok, qi, N,
        shift, scale_log2, seq_bias_rows, stride_bj, mask_rows, stride_mj, seed, drop_rows, P, dropout_p,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BOUNDS=True, CAUSAL=CAUSAL, HAS_BIAS=HAS_BIAS, HAS_MASK=HAS_MASK,
        DROPOUT=DROPOUT, EVEN_D=EVEN_D, UPCAST=UPCAST, PRECISION=PRECISION)

    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    o_ptrs = OUT + b * stride_ob + h * stride_oh + qi64 * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, lse, mask=rows_ok)


_fwd = autotuned(_fwd_kernel, FWD)


def attention_forward(q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, *, causal: bool, scale: float,
                      dropout_p: float, seed: int, bank: BankTable | None = None):
    """Attention of q over [prefix ; sequence] keys.

    Args:
        q: [B, Hq, N, D]; k, v: [B, Hkv, S, D]; prefix_k, prefix_v: [Hkv, P, D] shared or [B, Hkv, P, D].
            Any strides; fp16, bf16 or fp32; D <= 256.
        attn_mask: None or bool broadcastable to [B, Hq, N, S] (True = visible).
        attn_bias: None or a tensor of q's dtype broadcastable to [B, Hq, N, P + S].
        causal: bottom-right causal mask on the sequence keys.
        scale: score scale. dropout_p: probability dropout; `seed` fixes its mask.
        bank: row b's prefix is entry bank.index[b] of a prefix bank (prefix_k, prefix_v are None then).

    Returns:
        out [B, Hq, N, D] (contiguous, q.dtype) and lse [B, Hq, N] float32 (natural log; -inf and out = 0
        for rows that see no key).
    """
    B, Hq, N, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    prefix = prefix_args(prefix_k, prefix_v, bank, q)
    P = prefix["P"]
    out = torch.empty((B, Hq, N, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, N), dtype=torch.float32, device=q.device)
    bias, bias_strides = broadcast_operand(attn_bias, (B, Hq, N, P + S), q, "b")
    mask, mask_strides = broadcast_operand(attn_mask, (B, Hq, N, S), q, "m")
    with device_guard(q):
        _fwd[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), Hq, B)](
            q, k, v, **prefix, BIAS=bias, MASK=mask, OUT=out, LSE=lse,
            **strides("q", q), **strides("k", k), **strides("v", v), **bias_strides, **mask_strides,
            **strides("o", out), Hq=Hq, G=Hq // Hkv, N=N, S=S, scale_log2=scale * LOG2E_VALUE, dropout_p=dropout_p,
            seed=seed,
            TUNE_Q=triton.next_power_of_2(N), TUNE_KV=triton.next_power_of_2(P + S),
            CAUSAL=causal, HAS_MASK=attn_mask is not None, HAS_BIAS=attn_bias is not None,
            DROPOUT=dropout_p > 0, **compile_options(q))
    return out, lse
