"""What every fastprefix Triton kernel shares: jit helpers (tile loads, scores, online softmax, dropout) and
the launch utilities (strides as keyword arguments, broadcast operands, compile options, program counts).

Scores are kept in log2 units (scaled by log2(e)) so the softmax uses exp2; launchers return lse in natural
log. Under TRITON_INTERPRET=1 (set before this module is imported) the kernels run on CPU tensors; the
interpreter's tl.dot is wrong for bf16 operands, so dots are upcast to fp32 there (UPCAST).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)
"""True when the kernels were created by Triton's interpreter (TRITON_INTERPRET=1 at import)."""

LOG2E_VALUE = 1.4426950408889634

LOG2E: tl.constexpr = tl.constexpr(LOG2E_VALUE)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

INTERPRETER_BLOCK = 16
"""Rows and keys per tile of every kernel under the interpreter."""
INTERPRETER_PROGRAMS = 8
"""Programs a split launch aims for under the interpreter (no SMs to fill); a few, so that chunked
reductions and split-KV run in CPU tests too."""


# ----------------------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def load_rows(ptrs, rows_ok, d_ok, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A [rows, BLOCK_D] tile; rows outside the tensor and padded head-dim columns read as 0."""
    if CHECK_ROWS and not EVEN_D:
        tile = tl.load(ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
    elif not EVEN_D:
        tile = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def logits(qk, qi, kj, n_q, n_keys, shift, scale_log2, bias_ptrs, mask_ptrs,
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
        s += tl.load(bias_ptrs, mask=in_range, other=0.0).to(tl.float32) * LOG2E
    if BOUNDS or CAUSAL or HAS_MASK:
        visible = kj < n_keys
        if CAUSAL:
            visible = visible & (kj <= qi + shift)
        if HAS_MASK:
            visible = visible & (tl.load(mask_ptrs, mask=in_range, other=0) != 0)
        s = tl.where(visible, s, float("-inf"))
    return s


@triton.jit
def keep(seed, rows, cols, dropout_p):
    """Dropout keep decisions, P(keep) = 1 - dropout_p, for query rows `rows` (int64 b * Hq * N + h * N + i)
    and key columns `cols` (0 .. P + S), broadcast against each other. Philox keyed by the seed with the
    counter (column, row low word, row high word, 0): a decision depends on (seed, row, column) alone, so
    every kernel regenerates the forward's mask in any tile orientation."""
    c0, c1 = tl.broadcast(cols.to(tl.uint32), rows.to(tl.uint32))
    c2 = tl.broadcast_to((rows >> 32).to(tl.uint32), c0.shape)
    bits, _, _, _ = tl.philox(seed, c0, c1, c2, tl.zeros_like(c0))
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def grad_scores(qk, dp, lse2, delta, qi, kj, n_q, n_keys, shift, scale_log2, bias_ptrs, mask_ptrs,
                seed, drop_rows, drop_cols, dropout_p,
                BOUNDS: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
                DROPOUT: tl.constexpr):
    """From q.k and dO.v of a tile: (probabilities after dropout, dScores).

    p = exp(s - L) with the global lse; with dropout the kept probabilities are p * keep / (1 - dropout_p)
    and dP is scaled the same way; dS = p * (dP - rowsum(dO * O)). dS is the gradient of the natural-unit
    score, i.e. of the bias.
    """
    s = logits(qk, qi, kj, n_q, n_keys, shift, scale_log2, bias_ptrs, mask_ptrs,
               BOUNDS=BOUNDS, CAUSAL=CAUSAL, HAS_BIAS=HAS_BIAS, HAS_MASK=HAS_MASK)
    p = tl.math.exp2(s - lse2)
    kept = p
    if DROPOUT:
        keep_it = keep(seed, drop_rows, drop_cols, dropout_p)
        kept = tl.where(keep_it, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep_it, dp / (1.0 - dropout_p), 0.0)
    return kept, p * (dp - delta)


@triton.jit
def fwd_stage(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, k_tile, v_tile, lo, hi, n_keys, offs_n, d_ok,
              qi, n_q, shift, scale_log2, bias_rows, stride_bj, mask_rows, stride_mj, seed, drop_rows, col0, dropout_p,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BOUNDS: tl.constexpr, CAUSAL: tl.constexpr,
              HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, EVEN_D: tl.constexpr,
              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi) of one segment (prefix or sequence)."""
    for start in range(lo, hi, BLOCK_N):
        cols = start + offs_n
        kj = cols[None, :]
        start64 = tl.cast(start, tl.int64)
        k = load_rows(k_base + start64 * stride_kn + k_tile, cols < n_keys, d_ok, CHECK_ROWS=BOUNDS, EVEN_D=EVEN_D)
        qk = dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), UPCAST=UPCAST, PRECISION=PRECISION)
        kj64 = kj.to(tl.int64)  # column x stride may pass 2**31 (a transposed bias or mask)
        s = logits(qk, qi, kj, n_q, n_keys, shift, scale_log2, bias_rows + kj64 * stride_bj,
                   mask_rows + kj64 * stride_mj, BOUNDS=BOUNDS, CAUSAL=CAUSAL, HAS_BIAS=HAS_BIAS, HAS_MASK=HAS_MASK)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only hidden keys keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(keep(seed, drop_rows, col0 + kj, dropout_p), p / (1.0 - dropout_p), 0.0)
        v = load_rows(v_base + start64 * stride_vn + v_tile, cols < n_keys, d_ok, CHECK_ROWS=BOUNDS, EVEN_D=EVEN_D)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST=UPCAST, PRECISION=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def query_tile(Hq, G, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
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
def kv_tiles(K, V, b, hkv, stride_kb, stride_kh, stride_kn, stride_kd, stride_vb, stride_vh, stride_vn, stride_vd,
             offs_n, offs_d):
    """(keys base, values base, key tile offsets, value tile offsets) of KV head hkv of row b: the pointers a
    stage loop steps through, one [BLOCK_N, BLOCK_D] block at a time."""
    return (K + b * stride_kb + hkv * stride_kh, V + b * stride_vb + hkv * stride_vh,
            offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd)


@triton.jit
def sequence_ranges(m0, shift, S, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(full_hi, hi) for the query tile starting at row m0: sequence keys [0, full_hi) are seen in full by
    every row of the tile (no per-element mask), [full_hi, hi) need the mask, keys from hi on are hidden from
    every row (causal, query i sees key j iff j <= i + shift)."""
    full_hi = S // BLOCK_N * BLOCK_N
    hi = S
    if CAUSAL:
        full_hi = tl.minimum(tl.maximum(m0 + shift + 1, 0) // BLOCK_N * BLOCK_N, full_hi)
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + shift, 0), S)
    return full_hi, hi


# ----------------------------------------------------------------------------------------------------------
# Launch utilities
# ----------------------------------------------------------------------------------------------------------


def strides(name: str, t: torch.Tensor, dims: str = "bhnd") -> dict[str, int]:
    """The keyword arguments stride_<name><dim> of `t`, one per letter of `dims`."""
    return {f"stride_{name}{d}": s for d, s in zip(dims, t.stride(), strict=True)}


def prefix_strides(name: str, t: torch.Tensor) -> dict[str, int]:
    """[B, Hkv, P, D] strides of a prefix as keyword arguments; batch stride 0 for a shared [Hkv, P, D]."""
    values = (0, *t.stride()) if t.dim() == 3 else t.stride()
    return {f"stride_{name}{d}": s for d, s in zip("bhnd", values, strict=True)}


def broadcast_operand(t: torch.Tensor | None, shape: tuple[int, ...], dummy: torch.Tensor, name: str):
    """(tensor, strides as keyword arguments stride_<name>{b,h,n,j}) reading `t` as broadcast to `shape`:
    stride 0 along broadcast dimensions, no copy. A bool tensor is read as uint8. Without `t`: `dummy` and
    zero strides (never dereferenced)."""
    if t is None:
        return dummy, dict.fromkeys((f"stride_{name}{d}" for d in "bhnj"), 0)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    expanded = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)).expand(shape)
    return t, strides(name, expanded, "bhnj")


def device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def compile_options(q: torch.Tensor) -> dict:
    """Constexprs shared by all kernels: head dim, its power-of-two block (EVEN_D when they are equal), dot
    operand handling."""
    head_dim = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(head_dim))
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        EVEN_D=block_d == head_dim,
        UPCAST=INTERPRETED and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def target_programs(device: torch.device) -> int:
    """How many programs a launch should have in flight to fill the device."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_PROGRAMS


def chunks(units: int, programs: int, device: torch.device) -> tuple[int, int]:
    """Split `units` of work among chunks so that programs * chunks reaches the device's target.
    Returns (number of chunks, units per chunk); the last chunk may hold fewer."""
    count = max(1, min(units, triton.cdiv(target_programs(device), programs)))
    per_chunk = triton.cdiv(units, count)
    return triton.cdiv(units, per_chunk), per_chunk
