"""The Triton decode kernels (few queries per row, inference) against the float64 oracle, run on CPU tensors
by Triton's interpreter (16 x 16 tiles there), and the dispatch that picks them.

Shapes: S from 1 to 1000 (several tiles of stacked rows, splits that divide the key blocks and splits that
do not), N = 1 and a few (speculative steps, causal bottom-right), MHA/GQA/MQA, D = 80 (padded head), shared
and per-row prefix, P = 0 and S = 0. Every buffer the launchers allocate is NaN-poisoned first, and every
test checks that the decode kernels, not the general ones, produced the result.
"""

import pytest
import torch

from fastprefix import dispatch, kernels, prefix_attention
from fastprefix.checks import Dims
from fastprefix.kernels import common, decode
from fastprefix.testing import (DECODE_SHAPE_IDS, DECODE_SHAPES, AllocationRecorder, Case, compare_forward_to_oracle,
                                make_inputs, materialization_violations, oracle, relative_error)
from helpers.interpreter import device, poison_launchers

pytestmark = pytest.mark.skipif(not kernels.INTERPRETED and not torch.cuda.is_available(),
                                reason="needs a GPU or TRITON_INTERPRET=1 before Triton is imported")

FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "padmask": {"mask": "rows"},
    "t5bias": {"bias": "heads", "scale": 1.0},
    "all": {"causal": True, "mask": "full", "bias": "rows"},
}
LAYOUTS = [(True, torch.float32), (False, torch.float32), (True, torch.float16)]


class _Spy:
    """Wraps a launcher and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


class _GridRecorder:
    """Stands for a @triton.jit kernel and records the grid of every launch."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    poison_launchers(monkeypatch)


@pytest.fixture
def spies(monkeypatch):
    """(decode, general forward) spies on the launchers the Triton path calls."""
    found = _Spy(kernels.decode_forward), _Spy(kernels.attention_forward)
    monkeypatch.setattr(kernels, "decode_forward", found[0])
    monkeypatch.setattr(kernels, "attention_forward", found[1])
    return found


def assert_decode_matches_oracle(inp, spies):
    decode_calls = spies[0].calls
    failures = [str(c) for c in compare_forward_to_oracle(inp, "triton") if not c.ok]
    assert not failures, failures
    assert (spies[0].calls - decode_calls, spies[1].calls) == (1, 0), "the decode kernels did not run"


@pytest.mark.slow
@pytest.mark.parametrize("shared, dtype", LAYOUTS, ids=["shared-fp32", "per_row-fp32", "shared-fp16"])
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=DECODE_SHAPE_IDS)
def test_matches_oracle(shape, feature, shared, dtype, spies):
    case = Case(*shape, shared=shared, **FEATURES[feature])
    assert_decode_matches_oracle(make_inputs(case, dtype, device(), requires_grad=False), spies)


def test_bfloat16(spies):
    """bf16 dots: the interpreter upcasts their operands; a GPU uses bf16 MMAs."""
    case = Case(*DECODE_SHAPES[4], **FEATURES["all"])
    assert_decode_matches_oracle(make_inputs(case, torch.bfloat16, device(), requires_grad=False), spies)


def test_arbitrary_strides(spies):
    """q, k, v with a non-contiguous head dim, the shared prefix permuted, bias and mask transposed."""
    B, Hq, Hkv, N, S, P, D = 3, 4, 2, 2, 23, 9, 32

    def strided(*shape):
        return torch.randn(*shape[:-1], 2 * shape[-1], device=device())[..., ::2]

    inp = make_inputs(Case(B, Hq, Hkv, N, S, P, D), device=device(), requires_grad=False)
    inp.tensors = (strided(B, Hq, N, D), strided(B, Hkv, S, D), strided(B, Hkv, S, D),
                   torch.randn(P, Hkv, D, device=device()).transpose(0, 1), strided(Hkv, P, D))
    inp.options = {"causal": True, "attn_mask": (torch.rand(Hq, S, N, device=device()) > 0.3).transpose(-1, -2),
                   "attn_bias": torch.randn(B, Hq, P + S, N, device=device()).transpose(-1, -2)}
    assert not inp.tensors[0].is_contiguous() and not inp.tensors[3].is_contiguous()
    assert_decode_matches_oracle(inp, spies)


def test_rows_that_see_nothing(spies):
    """Causal with N > S and no prefix, and rows whose mask hides every key: out = 0, lse = -inf."""
    case = Case(B=2, Hq=4, Hkv=2, N=5, S=3, P=0, D=16, causal=True, mask="full")
    inp = make_inputs(case, device=device(), requires_grad=False)
    inp.options["attn_mask"][1, :, 4] = False
    assert_decode_matches_oracle(inp, spies)
    with torch.no_grad():
        out, lse = prefix_attention(*inp.tensors, **inp.options, return_lse=True, backend="triton")
    empty = torch.isneginf(oracle(inp)[1])
    assert empty[:, :, :2].all() and empty[1, :, 4].all()
    assert torch.equal(torch.isneginf(lse), empty) and (out[empty] == 0).all()


def test_equals_general_forward(spies):
    """The decode result is the general forward's, within fp32 rounding (two orders of summation)."""
    case = Case(B=3, Hq=6, Hkv=2, N=3, S=40, P=23, D=32, causal=True, mask="rows", bias="heads")
    inp = make_inputs(case, device=device(), requires_grad=False)
    options = dict(causal=True, scale=case.D ** -0.5)
    mask, bias = inp.options["attn_mask"], inp.options["attn_bias"]
    out, lse = kernels.decode_forward(*inp.tensors, mask, bias, **options)
    ref_out, ref_lse = kernels.attention_forward(*inp.tensors, mask, bias, dropout_p=0.0, seed=0, **options)
    assert relative_error(out, ref_out) < 1e-6 and relative_error(lse, ref_lse) < 1e-6


# ---------------------------------------------------------------------------------------------------------
# Splits and the stacked prefix tile
# ---------------------------------------------------------------------------------------------------------


def _recorded_decode(monkeypatch, inp):
    """Runs the decode path on `inp`; returns (out, lse, prefix kernel grids, rows kernel launches)."""
    prefix = _GridRecorder(decode._decode_prefix_kernel)
    rows = _GridRecorder(decode._decode_rows_kernel)
    monkeypatch.setattr(decode, "_decode_prefix_kernel", prefix)
    monkeypatch.setattr(decode, "_decode_rows_kernel", rows)
    with torch.no_grad():
        out, lse = prefix_attention(*inp.tensors, **inp.options, return_lse=True, backend="triton")
    return out, lse, prefix.grids, rows.grids


@pytest.mark.parametrize("programs, min_blocks, expected", [
    (1, 4, 1),     # one split: every key in one program
    (8, 1, 8),     # 63 blocks in 8 splits of 8 blocks (the last of 7 blocks, its last block partial)
    (6, 21, 3),    # splits of 21 blocks: 63 = 3 x 21, the split count divides the blocks
    (64, 1, 63),   # one block per split
], ids=["1split", "8uneven", "3even", "63blocks"])
def test_split_kv(programs, min_blocks, expected, monkeypatch, spies):
    """Split-KV over a long per-row cache (S = 1000 = 62.5 blocks of 16) after a per-row prefix (one more
    segment of one block), for split counts that do and do not divide the key blocks; each split's partial
    merged exactly."""
    monkeypatch.setattr(common, "INTERPRETER_PROGRAMS", programs * 4)  # B * Hkv = 4 programs per split
    monkeypatch.setattr(decode, "_MIN_SPLIT_BLOCKS", min_blocks)
    case = Case(B=2, Hq=4, Hkv=2, N=1, S=1000, P=16, D=16, shared=False, mask="rows")
    inp = make_inputs(case, device=device(), requires_grad=False)
    _, _, _, grids = _recorded_decode(monkeypatch, inp)
    assert grids == [(case.B * case.Hkv, 1, 1), (case.B * case.Hkv, 1, expected)]  # per-row prefix, cache
    assert_decode_matches_oracle(inp, spies)


@pytest.mark.parametrize("programs, expected", [(1, 1), (8, 3), (1000, 6)], ids=["1split", "3splits", "1block"])
def test_shared_prefix_split_k(programs, expected, monkeypatch, spies):
    """The shared prefix split across programs (P = 83: 6 blocks of 16, the last with 3 keys), merged
    exactly with the sequence part. 2 programs per split (one tile, 2 KV heads): a target of 8 programs
    asks for 4 splits, which makes splits of 2 blocks, so 3 splits (32, 32 and 19 keys)."""
    monkeypatch.setattr(common, "INTERPRETER_PROGRAMS", programs)
    monkeypatch.setattr(decode, "_MIN_SPLIT_BLOCKS", 1)
    case = Case(B=3, Hq=4, Hkv=2, N=1, S=20, P=83, D=16, bias="heads")
    inp = make_inputs(case, device=device(), requires_grad=False)
    _, _, grids, _ = _recorded_decode(monkeypatch, inp)
    assert grids == [(1, case.Hkv, expected)]
    assert_decode_matches_oracle(inp, spies)


def test_shared_prefix_is_read_once_per_batch(monkeypatch):
    """B * G * N = 12 stacked queries fit one 16-row tile: the prefix kernel's grid is one tile x Hkv x key
    ranges (which partition [0, P), test_splits_partition_the_keys), so each prefix key is loaded by one
    program for the whole batch, not once per row and query head. 20 stacked queries take two tiles."""
    for B, tiles in ((6, 1), (10, 2)):
        case = Case(B=B, Hq=4, Hkv=2, N=1, S=5, P=70, D=16)
        inp = make_inputs(case, device=device(), requires_grad=False)
        _, _, grids, _ = _recorded_decode(monkeypatch, inp)
        assert [grid[:2] for grid in grids] == [(tiles, case.Hkv)]


@pytest.mark.parametrize("n_keys, block_n, programs", [(1, 16, 1), (1000, 16, 3), (4096, 64, 32),
                                                       (256, 64, 10_000), (63 * 16, 16, 2)])
def test_splits_partition_the_keys(n_keys, block_n, programs, monkeypatch):
    """Every split is a whole number of blocks (the last may be shorter), at least _MIN_SPLIT_BLOCKS unless
    the keys are fewer, none empty, together exactly n_keys."""
    monkeypatch.setattr(common, "INTERPRETER_PROGRAMS", 264)
    count, per_split = decode.splits(n_keys, block_n, programs, torch.device("cpu"))
    assert per_split % block_n == 0 or per_split >= n_keys
    assert per_split >= min(n_keys, decode._MIN_SPLIT_BLOCKS * block_n)
    assert (count - 1) * per_split < n_keys <= count * per_split
    assert count <= max(1, -(-264 // programs))  # no more programs than the target asks for


def test_deterministic(monkeypatch):
    """No atomics: split partials are merged in a fixed order, so repeated calls agree bitwise."""
    monkeypatch.setattr(common, "INTERPRETER_PROGRAMS", 64)
    monkeypatch.setattr(decode, "_MIN_SPLIT_BLOCKS", 1)
    case = Case(B=3, Hq=4, Hkv=2, N=2, S=100, P=50, D=32, causal=True, mask="rows", bias="heads")
    inp = make_inputs(case, torch.float16, device(), requires_grad=False)
    with torch.no_grad():
        first = prefix_attention(*inp.tensors, **inp.options, return_lse=True, backend="triton")
        for _ in range(2):
            again = prefix_attention(*inp.tensors, **inp.options, return_lse=True, backend="triton")
            assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])


# ---------------------------------------------------------------------------------------------------------
# Dispatch and memory
# ---------------------------------------------------------------------------------------------------------


def test_dispatch_picks_decode_for_inference_only(spies):
    """N = 1 under no_grad or inference_mode, or without inputs that require grad: decode. A training call
    (inputs requiring grad, grad mode on), N > DECODE_MAX_N or dropout: the general kernels, and gradients
    flow."""
    inp = make_inputs(Case(B=2, Hq=4, Hkv=2, N=1, S=9, P=5, D=16), device=device())
    decode_spy, general_spy = spies

    def calls(run):
        before = decode_spy.calls, general_spy.calls
        run()
        return decode_spy.calls - before[0], general_spy.calls - before[1]

    args = inp.tensors
    with torch.no_grad():
        assert calls(lambda: prefix_attention(*args, backend="triton")) == (1, 0)
    with torch.inference_mode():
        assert calls(lambda: prefix_attention(*args, backend="triton")) == (1, 0)
    detached = [t.detach() for t in args]
    assert calls(lambda: prefix_attention(*detached, backend="triton")) == (1, 0)
    out = None

    def train():
        nonlocal out
        out = prefix_attention(*args, backend="triton")

    assert calls(train) == (0, 1)
    assert all(g is not None for g in torch.autograd.grad(out.sum(), args))
    with torch.no_grad():
        assert calls(lambda: prefix_attention(*args, dropout_p=0.5, backend="triton")) == (0, 1)
        long = make_inputs(Case(B=1, Hq=2, Hkv=2, N=dispatch.DECODE_MAX_N + 1, S=3, P=2, D=16), device=device())
        assert calls(lambda: prefix_attention(*long.tensors, backend="triton")) == (0, 1)


def test_decode_reasons_name_each_limit():
    decode_kernels, = (i for i in dispatch.IMPLEMENTATIONS if i.name == "triton-decode")

    def reasons(dims, dropout_p, needs_grad):
        call = dispatch.Call(dims, torch.float32, torch.device(device()), dropout_p, needs_grad, bias_grad=False)
        return decode_kernels.input_reasons(call)

    found = reasons(Dims(B=1, Hq=2, Hkv=1, N=17, S=3, P=2, D=256, shared=True), dropout_p=0.1, needs_grad=True)
    assert len(found) == 4
    for word in ("N = 17", "gradients", "dropout_p = 0.1", "D = 256"):
        assert any(word in r for r in found), (word, found)
    limits = Dims(B=1, Hq=2, Hkv=1, N=dispatch.DECODE_MAX_N, S=3, P=2, D=dispatch.DECODE_MAX_HEAD_DIM, shared=True)
    assert reasons(limits, dropout_p=0.0, needs_grad=False) == []


def test_shared_prefix_is_not_materialized(monkeypatch):
    """No tensor the decode path allocates has the shape or size of a per-row copy of the shared prefix or of
    concatenated keys, also when the prefix is split across programs (sizes chosen so that P + S = 20,
    P = 7 and D = 16 equal no other dimension)."""
    monkeypatch.setattr(decode, "_MIN_SPLIT_BLOCKS", 1)
    case = Case(B=3, Hq=4, Hkv=2, N=1, S=13, P=7, D=16, mask="rows", bias="heads")
    inp = make_inputs(case, device=device(), requires_grad=False)
    with AllocationRecorder() as rec, torch.no_grad():
        prefix_attention(*inp.tensors, **inp.options, backend="triton")
    assert any(shape[-1] == case.D for _, shape, _ in rec.produced)  # the recorder saw the partials
    assert materialization_violations(rec.produced, B=case.B, Hq=case.Hq, Hkv=case.Hkv, N=case.N, P=case.P,
                                      S=case.S, D=case.D, itemsize=4, shared=True) == []
