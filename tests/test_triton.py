"""The Triton kernels against the float64 oracle, run on CPU tensors by Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU).

Shapes are chosen around the interpreter's block size (16): P in {0, 1, 15, 17}, N not a multiple of 16,
several query and key blocks with causal N < S and N > S, MHA/GQA/MQA, D = 80 and 96 (padded heads).
Every buffer the launchers allocate is NaN-poisoned first, so an element a kernel forgets to write shows.
"""

import pytest
import torch

from fastprefix import kernels, prefix_attention
from fastprefix.kernels import common, tuning
from fastprefix.testing import (Case, compare_to_oracle, dropout_probabilities, make_inputs, oracle,
                                relative_error)
from helpers.cases import FEATURES
from helpers.interpreter import device, poison_launchers

BLOCK = common.INTERPRETER_BLOCK

SHAPES = [  # B, Hq, Hkv, N, S, P, D
    (1, 2, 2, 1, 1, 1, 64),                  # one query, one key, one prefix token
    (2, 4, 2, 17, 33, BLOCK - 1, 64),        # GQA, N < S over several blocks, prefix one short of a block
    (2, 3, 1, 21, 13, BLOCK + 1, 80),        # MQA, N > S: causal rows before N - S see only the prefix
    (2, 4, 4, 2 * BLOCK, 2 * BLOCK, 0, 96),  # MHA, no prefix, whole blocks
    (1, 8, 2, 1, 40, 20, 128),               # a decoding step against a cache
    (2, 4, 2, 3, 0, 5, 64),                  # no sequence keys
]
SHAPE_IDS = ["B{}-H{}x{}-N{}-S{}-P{}-D{}".format(*s) for s in SHAPES]

pytestmark = pytest.mark.skipif(not kernels.INTERPRETED and not torch.cuda.is_available(),
                                reason="needs a GPU or TRITON_INTERPRET=1 before Triton is imported")


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    poison_launchers(monkeypatch)


def assert_matches_oracle(inp):
    failures = [str(c) for c in compare_to_oracle(inp, "triton") if not c.ok]
    assert not failures, failures


# A per-row prefix differs from a shared one in strides and in how its gradient is summed, not in dtype.
LAYOUTS = [(True, torch.float32), (False, torch.float32), (True, torch.float16)]


@pytest.mark.slow
@pytest.mark.parametrize("shared, dtype", LAYOUTS, ids=["shared-fp32", "per_row-fp32", "shared-fp16"])
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_oracle(shape, feature, shared, dtype):
    assert_matches_oracle(make_inputs(Case(*shape, shared=shared, **FEATURES[feature]), dtype, device()))


@pytest.mark.parametrize("feature", ["plain", "all"])
def test_bfloat16(feature):
    """bf16 dots: the interpreter upcasts their operands (its bf16 tl.dot is wrong); a GPU uses bf16 MMAs."""
    case = Case(*SHAPES[1], **FEATURES[feature])
    assert_matches_oracle(make_inputs(case, torch.bfloat16, device()))


def test_arbitrary_strides():
    """Every operand a strided view: head dim not contiguous, bias and mask transposed, prefix permuted."""
    B, Hq, Hkv, N, S, P, D = 2, 4, 2, 19, 23, 9, 64

    def strided(*shape):
        return torch.randn(*shape[:-1], 2 * shape[-1], device=device())[..., ::2].requires_grad_()

    q, k, v = strided(B, Hq, N, D), strided(B, Hkv, S, D), strided(B, Hkv, S, D)
    prefix_k = torch.randn(P, Hkv, D, device=device()).transpose(0, 1).requires_grad_()
    prefix_v = strided(Hkv, P, D)
    bias = torch.randn(B, Hq, P + S, N, device=device()).transpose(-1, -2).requires_grad_()
    mask = (torch.rand(Hq, S, N, device=device()) > 0.3).transpose(-1, -2)
    assert not q.is_contiguous() and prefix_k.stride(-1) == 1 and bias.stride(-1) != 1
    inp = make_inputs(Case(B, Hq, Hkv, N, S, P, D), device=device())
    inp.tensors = (q, k, v, prefix_k, prefix_v)
    inp.options = {"causal": True, "attn_mask": mask, "attn_bias": bias}
    assert_matches_oracle(inp)


@pytest.mark.parametrize("programs", [1, 3, 1000])
def test_shared_prefix_gradient_chunking(programs, monkeypatch):
    """The shared prefix's gradient is summed over B * G (row, head) pairs in chunks: one chunk, uneven
    chunks (B * G = 15 pairs in chunks of 5... 3), one pair per chunk. Same for a bias broadcast over rows."""
    monkeypatch.setattr(common, "INTERPRETER_PROGRAMS", programs)
    case = Case(B=5, Hq=6, Hkv=2, N=9, S=11, P=BLOCK + 3, D=64, bias="heads", bias_grad=True)
    assert_matches_oracle(make_inputs(case, device=device()))


def _backward(inp, dout):
    out = prefix_attention(*inp.tensors, **inp.options, backend="triton")
    return torch.autograd.grad(out, inp.grad_targets(), dout)


def test_backward_is_deterministic():
    """No atomics: the same inputs give bitwise the same gradients, run after run (shared prefix split in
    chunks, bias broadcast over rows and heads)."""
    case = Case(B=5, Hq=4, Hkv=2, N=9, S=18, P=7, D=32, causal=True, mask="rows", bias="1d", bias_grad=True)
    inp = make_inputs(case, torch.float16, device())
    dout = torch.randn(case.B, case.Hq, case.N, case.D, dtype=torch.float16, device=device())
    first = _backward(inp, dout)
    for _ in range(2):
        assert all(torch.equal(a, b) for a, b in zip(first, _backward(inp, dout)))


def test_rows_that_see_nothing():
    """Causal N > S with no prefix, and masked-out rows: out = 0, lse = -inf, finite gradients."""
    case = Case(B=2, Hq=4, Hkv=2, N=20, S=6, P=0, D=64, causal=True, mask="full", bias="rows", bias_grad=True)
    inp = make_inputs(case, device=device())
    inp.options["attn_mask"][1, :, 17] = False
    out, lse = prefix_attention(*inp.tensors, **inp.options, return_lse=True, backend="triton")
    empty = torch.isneginf(oracle(inp)[1])
    assert empty[:, :, :14].all() and empty[1, :, 17].all()
    assert torch.equal(torch.isneginf(lse), empty) and (out[empty] == 0).all()
    grads = torch.autograd.grad(out, inp.grad_targets(), torch.randn_like(out))
    assert all(g.isfinite().all() for g in grads)
    assert_matches_oracle(inp)


# ---------------------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------------------

DROPOUT_P = 0.3


def test_dropout_mask_is_the_same_in_forward_and_backward():
    """Forward and backward reveal the same mask (fastprefix.testing.dropout_probabilities), kept at rate
    1 - p, the kept probabilities scaled by 1 / (1 - p)."""
    B, Hq, Hkv, N, S, P, D = 3, 4, 2, 16, 40, 24, 64
    torch.manual_seed(11)
    forward, backward, kept = dropout_probabilities(B, Hq, Hkv, N, S, P, D, DROPOUT_P, device=device())
    assert torch.equal(kept, backward != 0)
    torch.testing.assert_close(backward, forward, rtol=1e-5, atol=0)
    torch.manual_seed(11)
    probs = dropout_probabilities(B, Hq, Hkv, N, S, P, D, 0.0, device=device())[0]
    torch.testing.assert_close(forward[kept], probs[kept] / (1 - DROPOUT_P), rtol=1e-5, atol=1e-7)
    for cols in (slice(0, P), slice(P, None)):
        rate = kept[..., cols].float().mean().item()
        draws = kept[..., cols].numel()
        assert abs(rate - (1 - DROPOUT_P)) < 5 * (DROPOUT_P * (1 - DROPOUT_P) / draws) ** 0.5, (rate, draws)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
def test_dropout_gradients_are_those_of_the_forward(shared):
    """Directional derivatives with the seed fixed per call: for each input x and a random direction d,
    (f(x + eps d) - f(x - eps d)) / 2 eps . dO equals grad_x . d. A backward that drew a different mask
    than its forward would miss by O(1)."""
    case = Case(B=2, Hq=4, Hkv=2, N=13, S=18, P=5, D=16, shared=shared, causal=True, mask="rows", bias="heads",
                bias_grad=True)
    inp = make_inputs(case, device=device())
    targets = inp.grad_targets()
    options = {key: value for key, value in inp.options.items() if key != "attn_bias"}

    def attention(*xs):
        torch.manual_seed(5)
        return prefix_attention(*xs[:5], **options, attn_bias=xs[5], dropout_p=DROPOUT_P, backend="triton")

    out = attention(*targets)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, targets, dout)
    eps = 1e-2
    with torch.no_grad():
        for i, (x, g) in enumerate(zip(targets, grads)):
            d = torch.randn_like(x)
            plus = [t + eps * d if j == i else t for j, t in enumerate(targets)]
            minus = [t - eps * d if j == i else t for j, t in enumerate(targets)]
            numeric = ((attention(*plus) - attention(*minus)) * dout).sum().item() / (2 * eps)
            analytic = (g * d).sum().item()
            assert abs(numeric - analytic) <= 2e-3 * max(1.0, abs(analytic)), (i, numeric, analytic)


def test_dropout_zero_is_exactly_no_dropout():
    """dropout_p = 0.0 given explicitly equals the oracle without dropout, element-wise (forward and, with
    inputs that need gradients, the general kernels); the same comparison sees dropout when it is on."""
    inp = make_inputs(Case(B=2, Hq=4, Hkv=2, N=17, S=9, P=5, D=64, causal=True, bias="rows"), device=device())
    expected = oracle(inp)[0]

    def error(p):
        out = prefix_attention(*inp.tensors, **inp.options, dropout_p=p, backend="triton")
        return (out - expected).abs().max().item()

    assert error(0.0) < 1e-5
    assert error(0.5) > 0.1


def test_dropout_is_reproducible_from_the_seed_and_fresh_per_call():
    args = make_inputs(Case(B=2, Hq=2, Hkv=1, N=5, S=7, P=3, D=64), device=device(), requires_grad=False).tensors
    torch.manual_seed(1234)
    first = prefix_attention(*args, dropout_p=0.5, backend="triton")
    second = prefix_attention(*args, dropout_p=0.5, backend="triton")
    torch.manual_seed(1234)
    assert torch.equal(prefix_attention(*args, dropout_p=0.5, backend="triton"), first)
    assert not torch.equal(second, first)


def test_lse_is_natural_log():
    inp = make_inputs(Case(B=1, Hq=2, Hkv=1, N=5, S=7, P=3, D=64), device=device(), requires_grad=False)
    _, lse = prefix_attention(*inp.tensors, return_lse=True, backend="triton")
    assert relative_error(lse, oracle(inp)[1]) < 1e-6


# ---------------------------------------------------------------------------------------------------------
# Launch configuration (GPU-side choice, exercised here with a simulated compute capability)
# ---------------------------------------------------------------------------------------------------------


class _Properties:
    def __init__(self, arch):
        self.shared_memory_per_block_optin = {80: 163, 86: 99, 90: 227}[arch] * 1024  # A100, RTX 3090, H100


def _kept(monkeypatch, name, arch, *, n_q=4096, head_dim=128, mask=False, bias=False, dropout=False,
          dtype=torch.float16):
    """The (BLOCK_M, BLOCK_N, num_warps[, 1 if unpipelined]) Triton's autotuner keeps for kernel `name` on
    an A100 (arch 80), an RTX 3090 (86) or an H100 (90)."""
    import triton

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: divmod(arch, 10))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: _Properties(arch))
    configs = [config.triton_config() for config in tuning.TUNED[name].candidates]
    prune = tuning.pruner(tuning.TUNED[name])
    kept = prune(configs, {"Q": torch.empty(0, dtype=dtype)}, TUNE_Q=n_q, TUNE_KV=4096, HEAD_DIM=head_dim,
                 BLOCK_D=max(16, triton.next_power_of_2(head_dim)), CAUSAL=True, HAS_MASK=mask, HAS_BIAS=bias,
                 DROPOUT=dropout)
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) + ((1,) if c.num_stages == 1 else ())
            for c in kept}


def test_pruner_keeps_what_the_compile_report_verified(monkeypatch):
    """128 x 64 forward tiles only where they do not spill (sm_90, or D <= 64; no mask, bias or dropout)
    and fit in shared memory; 16-row query tiles for decoding, or when nothing larger fits (D = 256), and at
    D = 256 with a mask, bias or dropout 16 x 32 tiles only (16 x 64 spills there). float32 is not launched on
    GPUs: the pruner refuses it (the dispatcher sends it to the torch backend first)."""
    assert (128, 64, 8) in _kept(monkeypatch, "fwd", 90)
    assert (128, 64, 8) not in _kept(monkeypatch, "fwd", 80)
    assert (128, 64, 8) in _kept(monkeypatch, "fwd", 80, head_dim=64)
    assert (128, 64, 8) not in _kept(monkeypatch, "fwd", 90, dropout=True)
    assert _kept(monkeypatch, "fwd", 90, n_q=1) == {(16, 64, 4)}
    assert _kept(monkeypatch, "fwd", 90, head_dim=256) == {(16, 64, 4), (16, 32, 4)}
    assert _kept(monkeypatch, "fwd", 90, head_dim=256, mask=True) == {(16, 32, 4)}
    assert _kept(monkeypatch, "fwd", 80, head_dim=256) == {(16, 32, 4)}  # 16 x 64 needs 200 KB with 3 stages
    assert (128, 32, 8) not in _kept(monkeypatch, "dq", 80, mask=True, bias=True, dropout=True)
    assert (32, 64, 8) not in _kept(monkeypatch, "dkdv", 90, bias=True, dropout=True)
    assert _kept(monkeypatch, "dkdv", 90, head_dim=256) == {(16, 32, 8)}
    with pytest.raises(RuntimeError, match="no launch config of the fwd kernel fits sm_90"):
        _kept(monkeypatch, "fwd", 90, dtype=torch.float32)


def test_inputs_that_need_no_gradient_get_no_gradient_kernel(monkeypatch):
    """A frozen prefix (prefix tuning's base model, a shared prompt) gets no dK/dV launch; frozen sequence keys
    and values none either. The gradients that are asked for match the oracle."""
    from fastprefix.kernels import backward

    launches, dkdv = [], backward._dkdv

    class Recorder:
        def __getitem__(self, grid):
            launches.append(grid)
            return dkdv[grid]

    monkeypatch.setattr(backward, "_dkdv", Recorder())
    inp = make_inputs(Case(B=2, Hq=4, Hkv=2, N=9, S=11, P=5, D=32, causal=True), device=device())
    q, k, v, pk, pv = inp.tensors
    cases = (((pk, pv), (q, k, v), 1), ((k, v), (q, pk, pv), 1), ((k, v, pk, pv), (q,), 0))
    for frozen, wanted, expected_launches in cases:
        for t in inp.tensors:
            t.requires_grad_(not any(t is f for f in frozen))
        launches.clear()
        out = prefix_attention(*inp.tensors, **inp.options, backend="triton")
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, wanted, dout)
        assert len(launches) == expected_launches
        ref_out, _, leaves = oracle(inp)
        ref = torch.autograd.grad(ref_out, [l for l in leaves if l.requires_grad], dout.double())
        assert all((g.double() - r).abs().max() < 1e-5 for g, r in zip(grads, ref))
