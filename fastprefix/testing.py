"""Random cases and the oracles, shared by the tests, the benchmarks and `fastprefix check`: the float64
attention oracle over the concatenated keys, and greedy decoding by a model's forward for generation."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .checks import Dims
from .ops import prefix_attention
from .reference import reference_attention

GRAD_NAMES = ("dq", "dk", "dv", "dprefix_k", "dprefix_v", "dattn_bias")
# B, Hq, Hkv, N, S, P, D: decoding steps (a few queries per row) against caches of 1 to 1000 keys. Blocks and
# tiles in the comments are those of the Triton decode kernels under the interpreter (16 x 16).
DECODE_SHAPES = [
    (1, 2, 2, 1, 1, 1, 64),       # MHA, one cached key, one prefix token
    (3, 4, 2, 1, 17, 21, 32),     # GQA, S and P one past a block
    (2, 4, 1, 1, 257, 16, 32),    # MQA, S one past 16 blocks, P one whole block
    (2, 8, 2, 1, 1000, 40, 16),   # a long cache: 63 key blocks, split when programs are few
    (5, 4, 2, 2, 33, 19, 64),     # 2 draft tokens: B * G * N = 20 stacked rows, two tiles, the second partial
    (3, 6, 2, 4, 9, 17, 80),      # 4 queries, padded head dim, 36 stacked rows
    (2, 4, 2, 16, 20, 5, 32),     # N = DECODE_MAX_N: G * N = 32 rows per KV head, two row tiles
    (2, 4, 2, 3, 0, 5, 16),       # no sequence keys
    (2, 4, 2, 3, 12, 0, 16),      # no prefix
]
DECODE_SHAPE_IDS = ["B{}-H{}x{}-N{}-S{}-P{}-D{}".format(*s) for s in DECODE_SHAPES]


@dataclass(frozen=True)
class Case(Dims):
    """One prefix-attention problem: its sizes, and features. mask/bias name a broadcast shape (see
    `_mask_shape`) or None."""

    shared: bool = True
    causal: bool = False
    mask: str | None = None
    bias: str | None = None
    bias_grad: bool = False
    scale: float | None = None
    transposed: bool = True

    def __str__(self) -> str:
        flags = [f for f, on in (("shared", self.shared), ("causal", self.causal), ("biasgrad", self.bias_grad))
                 if on]
        extra = ([f"mask={self.mask}"] * bool(self.mask) + [f"bias={self.bias}"] * bool(self.bias)
                 + [f"scale={self.scale}"] * (self.scale is not None))
        return (f"B{self.B}-H{self.Hq}/{self.Hkv}-N{self.N}-S{self.S}-P{self.P}-D{self.D}"
                + "".join(f"-{f}" for f in flags + extra))


def _mask_shape(kind: str, c: Case, cols: int) -> tuple[int, ...]:
    return {
        "full": (c.B, c.Hq, c.N, cols),
        "rows": (c.B, 1, 1, cols),
        "heads": (1, c.Hq, c.N, cols),
        "2d": (c.N, cols),
        "1d": (cols,),
    }[kind]


@dataclass
class Inputs:
    """Tensors of a `Case`, ready to pass as `prefix_attention(*inp.tensors, **inp.options)`."""

    tensors: tuple[torch.Tensor, ...]
    options: dict = field(default_factory=dict)

    def grad_targets(self) -> list[torch.Tensor]:
        bias = self.options.get("attn_bias")
        return list(self.tensors) + ([bias] if bias is not None and bias.requires_grad else [])


def make_inputs(case: Case, dtype=torch.float32, device="cpu", requires_grad=True, generator=None) -> Inputs:
    """Gaussian inputs for `case`. With `transposed`, q/k/v are [B, N, H, D] buffers viewed as
    [B, H, N, D], the layout HuggingFace attention modules hand over. With an explicit `scale` (T5's 1.0) the
    queries are drawn with standard deviation D ** -0.5 / scale, as T5's query projection is initialized, so
    the scores have the spread of the default scale's (a softmax over scores of spread sqrt(D) is so sharp that
    any float32 implementation loses most of its digits there)."""
    c = case

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator, device=device) * std).to(dtype)

    def seq(heads, length, std=1.0):
        t = (randn(c.B, length, heads, c.D, std=std).transpose(1, 2) if c.transposed
             else randn(c.B, heads, length, c.D, std=std))
        return t.requires_grad_(requires_grad)

    q_std = 1.0 if c.scale is None else c.D ** -0.5 / c.scale
    pshape = (c.Hkv, c.P, c.D) if c.shared else (c.B, c.Hkv, c.P, c.D)
    tensors = (seq(c.Hq, c.N, q_std), seq(c.Hkv, c.S), seq(c.Hkv, c.S),
               randn(*pshape).requires_grad_(requires_grad), randn(*pshape).requires_grad_(requires_grad))
    options = {"causal": c.causal}
    if c.scale is not None:
        options["scale"] = c.scale
    if c.mask:
        mask = torch.rand(_mask_shape(c.mask, c, c.S), generator=generator, device=device) > 0.3
        options["attn_mask"] = mask
    if c.bias:
        bias = randn(*_mask_shape(c.bias, c, c.P + c.S))
        options["attn_bias"] = bias.requires_grad_(c.bias_grad and requires_grad)
    return Inputs(tensors, options)


def oracle(inputs: Inputs, dtype=torch.float64):
    """(out, lse) of the reference over the inputs upcast to `dtype`, differentiable w.r.t. those copies.

    Returns (out, lse, leaves): `leaves` are the upcast copies, in the order of `Inputs.grad_targets`.
    """
    leaves = [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in inputs.grad_targets()]
    options = dict(inputs.options)
    if "attn_bias" in options:
        bias = options["attn_bias"]
        options["attn_bias"] = leaves[5] if bias.requires_grad else bias.detach().to(dtype)
    out, lse = reference_attention(*leaves[:5], compute_dtype=dtype, **options)
    return out, lse, leaves


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    a, e = actual.detach().double(), expected.detach().double()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff if denom == 0 else diff / denom


FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
"""Absolute error every comparison allows: where the exact value is 0 (dq of a row whose softmax has a single
visible key) a backend's float32 rounding leaves up to ~2e-6 (Gaussian inputs, D = 64)."""


@dataclass(frozen=True)
class Comparison:
    """One quantity of a backend against the float64 oracle, element by element (FlashAttention's policy):
    the largest absolute error (`error`, at index `where`) may be at most twice the largest error of the same
    math run in the backend's dtype (`same_precision_error`) plus `atol`: the rounding of values of the
    quantity's size in that dtype (FlashAttention's `(x + 0.3 - 0.3 - x)`), plus FLOOR."""

    name: str
    error: float
    where: tuple[int, ...]
    same_precision_error: float
    atol: float

    @property
    def bound(self) -> float:
        return 2 * self.same_precision_error + self.atol

    @property
    def ok(self) -> bool:
        return self.error <= self.bound

    def __str__(self) -> str:
        return (f"{self.name}: max abs error {self.error:.2e} at {list(self.where)}, bound {self.bound:.2e} = 2 x "
                f"{self.same_precision_error:.2e} (same math in this dtype) + {self.atol:.1e}")


def compare(name: str, actual, expected, same_precision, valid=None) -> Comparison:
    """`actual` (in the backend's dtype) against `expected` (float64) element-wise; `same_precision` is the
    oracle's math run in the backend's dtype. `valid`: a bool mask of the elements to compare (all if None)."""
    expected = expected.detach().double()
    diff = (actual.detach().double() - expected).abs()
    same = (same_precision.detach().double() - expected).abs()
    if valid is not None:
        diff, same, expected = diff.masked_fill(~valid, 0.0), same.masked_fill(~valid, 0.0), expected[valid]
    if diff.numel() == 0:
        return Comparison(name, 0.0, (), 0.0, FLOOR[actual.dtype])
    size = expected.abs().max().item() if expected.numel() else 0.0
    atol = torch.finfo(actual.dtype).eps * (0.3 + size) + FLOOR[actual.dtype]
    where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    return Comparison(name, diff.max().item(), where, same.max().item(), atol)


def _forward_comparisons(out, lse, ref_out, ref_lse, same_out, same_lse) -> list[Comparison]:
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse).cpu(), empty.cpu()), "rows that see no key differ from the oracle's"
    return [compare("out", out, ref_out, same_out), compare("lse", lse, ref_lse, same_lse, valid=~empty)]


def compare_forward_to_oracle(inputs: Inputs, backend: str) -> list[Comparison]:
    """Forward and lse of `backend` under torch.no_grad (inference: on the Triton backend, the decode
    kernels when there are few queries) against the float64 oracle. Raises AssertionError on a wrong dtype,
    shape or set of empty rows."""
    q = inputs.tensors[0]
    with torch.no_grad():
        out, lse = prefix_attention(*inputs.tensors, **inputs.options, return_lse=True, backend=backend)
        ref_out, ref_lse, _ = oracle(inputs)
        same_out, same_lse, _ = oracle(inputs, dtype=q.dtype)
    assert out.dtype == q.dtype and out.shape == q.shape, (out.dtype, out.shape)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1], (lse.dtype, lse.shape)
    return _forward_comparisons(out, lse, ref_out, ref_lse, same_out, same_lse)


def compare_to_oracle(inputs: Inputs, backend: str) -> list[Comparison]:
    """Forward, lse and every gradient of `backend` against the float64 oracle, on the same inputs and
    the same random output gradient. Raises AssertionError on a wrong dtype, shape or set of empty rows."""
    q = inputs.tensors[0]
    out, lse = prefix_attention(*inputs.tensors, **inputs.options, return_lse=True, backend=backend)
    assert out.dtype == q.dtype and out.shape == q.shape, (out.dtype, out.shape)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1], (lse.dtype, lse.shape)
    ref_out, ref_lse, leaves = oracle(inputs)
    dout = torch.randn_like(ref_out)
    grads = torch.autograd.grad(out, inputs.grad_targets(), dout.to(q.dtype))
    ref_grads = torch.autograd.grad(ref_out, leaves, dout)
    same_out, same_lse, same_leaves = oracle(inputs, dtype=q.dtype)
    same_grads = torch.autograd.grad(same_out, same_leaves, dout.to(q.dtype))

    result = _forward_comparisons(out, lse, ref_out, ref_lse, same_out, same_lse)
    for name, g, rg, sg in zip(GRAD_NAMES, grads, ref_grads, same_grads):
        assert g.shape == rg.shape and g.dtype == q.dtype, (name, g.shape, g.dtype)
        result.append(compare(name, g, rg, sg))
    return result


@torch.no_grad()
def greedy_by_forward(forward, input_ids: torch.Tensor, new_tokens: int, decoder_start: int | None = None):
    """Greedy decoding by re-running `forward` on the whole growing sequence, without a cache: the oracle for
    generation (PEFT's forward is right where its `generate` is not). For a causal LM (`decoder_start` None)
    the sequence is `input_ids` [B, n] (unpadded rows) and the tokens so far; for a seq2seq LM it is the
    decoder's, from `decoder_start`, with `input_ids` as the encoder's input. Returns the new tokens
    [B, new_tokens]."""
    if decoder_start is None:
        seq = input_ids
        for _ in range(new_tokens):
            seq = torch.cat([seq, forward(input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
        return seq[:, input_ids.shape[1]:]
    seq = torch.full((input_ids.shape[0], 1), decoder_start, dtype=input_ids.dtype, device=input_ids.device)
    for _ in range(new_tokens):
        seq = torch.cat([seq, forward(input_ids=input_ids, decoder_input_ids=seq).logits[:, -1:].argmax(-1)], dim=1)
    return seq[:, 1:]


def dropout_probabilities(B, Hq, Hkv, N, S, P, D, dropout_p, *, backend="triton", dtype=torch.float32, device="cpu"):
    """(forward, backward, kept): the attention probabilities after dropout of every (row, head, query,
    column) [B, Hq, N, P + S] as `backend`'s forward used them and as its backward used them, and the kept
    ones (forward != 0). Equal forward and backward mean both drew the same dropout mask.

    Values and a per-row prefix are one-hot per key column (column j of [prefix ; sequence] has value e_j),
    so out[b, h, i, j] is column j's dropped probability; with dO[b, h, i] = e_(g * N + i), so is
    dV[b, hkv, j, g * N + i]. Needs P + S <= D and (Hq // Hkv) * N <= D."""
    G = Hq // Hkv
    if P + S > D or G * N > D:
        raise ValueError(f"one-hot columns and query slots need D >= P + S and D >= G * N, got D = {D}, "
                         f"P + S = {P + S}, G * N = {G * N}")
    q, k, _, pk, _ = make_inputs(Case(B, Hq, Hkv, N, S, P, D, shared=False), dtype, device,
                                 requires_grad=False).tensors
    eye = torch.eye(D, dtype=dtype, device=device)
    pv = eye[:P].expand(B, Hkv, -1, -1).clone().requires_grad_()
    v = eye[P: P + S].expand(B, Hkv, -1, -1).clone().requires_grad_()
    out = prefix_attention(q, k, v, pk, pv, dropout_p=dropout_p, backend=backend)
    dout = eye[: G * N].reshape(G, N, D).repeat(B, Hkv, 1, 1)
    dpv, dv = torch.autograd.grad(out, (pv, v), dout)
    forward = out[..., : P + S]
    backward = torch.cat([dpv, dv], dim=2)[..., : G * N].reshape(B, Hkv, P + S, G, N)
    backward = backward.permute(0, 1, 3, 4, 2).reshape(forward.shape)
    return forward, backward, forward != 0


class AllocationRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records (op name, shape, storage bytes) of every tensor an aten op produces while active.

    Views are recorded too; `storage_bytes` tells a view of a small tensor from a real copy.
    """

    def __init__(self):
        super().__init__()
        self.produced: list[tuple[str, tuple[int, ...], int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        for t in outputs:
            if isinstance(t, torch.Tensor):
                self.produced.append((str(func), tuple(t.shape), t.untyped_storage().nbytes()))
        return result


def materialization_violations(produced, *, B, Hq, Hkv, N, P, S, D, itemsize, shared) -> list[str]:
    """Produced tensors that betray a materialized prefix:
    * keys or values concatenated with the prefix: dims P + S and D;
    * scores over the concatenated columns: a dim P + S and storage for B * Hq * N * (P + S) elements
      (an attn_bias broadcast over B or heads is smaller, so pass one that is);
    * for a shared prefix, the prefix copied per row: dims P and D and storage for B * Hkv * P * D elements.
    Choose sizes so that P + S, P and D coincide with no other dimension."""
    bad = []
    for op, shape, nbytes in produced:
        if P + S in shape and (D in shape or nbytes >= B * Hq * N * (P + S) * itemsize):
            bad.append(f"{op} produced {list(shape)}: P + S = {P + S} key columns")
        if shared and P in shape and D in shape and nbytes >= B * Hkv * P * D * itemsize:
            bad.append(f"{op} produced {list(shape)} ({nbytes} bytes): the shared prefix copied per row")
    return bad
