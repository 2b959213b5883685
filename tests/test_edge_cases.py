"""Rows that see nothing, dropout, and the other behaviours the oracle grid does not pin down."""

import pytest
import torch

from fastprefix import prefix_attention
from fastprefix.reference import causal_visibility
from fastprefix.testing import Case, make_inputs, oracle, relative_error


def _grads(out, inp):
    return torch.autograd.grad(out, inp.grad_targets(), torch.randn_like(out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_rows_that_see_nothing_are_zero(any_backend, dtype):
    """P = 0 with a mask hiding every key of some rows, and causal N > S: zeros and -inf, never NaN."""
    case = Case(B=2, Hq=4, Hkv=2, N=9, S=6, P=0, D=64, causal=True, mask="full")
    inp = make_inputs(case, dtype)
    inp.options["attn_mask"][0, 1, 7] = False
    inp.options["attn_mask"][1, :, 8] = False
    out, lse = prefix_attention(*inp.tensors, **inp.options, return_lse=True, backend=any_backend)
    _, ref_lse, _ = oracle(inp)
    empty = torch.isneginf(ref_lse)
    assert empty[:, :, :3].all() and empty[0, 1, 7] and empty[1, :, 8].all()
    assert torch.equal(torch.isneginf(lse), empty)
    assert (out[empty] == 0).all() and not out.isnan().any()
    for g in _grads(out, inp):
        assert g.isfinite().all()


def test_no_keys_at_all(any_backend):
    """P = 0 and S = 0: every row sees nothing."""
    inp = make_inputs(Case(B=2, Hq=2, Hkv=1, N=3, S=0, P=0, D=64))
    out, lse = prefix_attention(*inp.tensors, return_lse=True, backend=any_backend)
    assert (out == 0).all() and torch.isneginf(lse).all()
    dq = _grads(out, inp)[0]
    assert (dq == 0).all()


def test_prefix_keeps_causally_empty_rows_alive(any_backend):
    """With a prefix, rows that see no sequence key attend to the prefix alone."""
    case = Case(B=1, Hq=2, Hkv=2, N=8, S=3, P=4, D=64, causal=True)
    inp = make_inputs(case)
    out = prefix_attention(*inp.tensors, **inp.options, backend=any_backend)
    q, _, _, pk, pv = (t.detach().double() for t in inp.tensors)
    probs = torch.softmax(q[:, :, :5] @ pk.transpose(-1, -2) * 64 ** -0.5, dim=-1)
    assert relative_error(out[:, :, :5], probs @ pv) < 1e-5


def test_dropout_zero_is_exactly_no_dropout(backend):
    """dropout_p = 0.0 given explicitly equals the oracle without dropout, element-wise; the same comparison sees
    dropout when it is on."""
    inp = make_inputs(Case(B=2, Hq=4, Hkv=2, N=7, S=9, P=5, D=64, causal=True), requires_grad=False)
    expected = oracle(inp)[0]

    def error(p):
        return (prefix_attention(*inp.tensors, **inp.options, dropout_p=p, backend=backend) - expected).abs().max()

    assert error(0.0) < 1e-5
    assert error(0.5) > 0.1


def _one_hot_values(case):
    """Inputs whose values are one-hot per key column, so out[..., j] = dropped probability of column j."""
    inp = make_inputs(case, requires_grad=False)
    q, k, _, pk, _ = inp.tensors
    eye = torch.eye(case.D)
    pv = eye[: case.P].expand(case.Hkv, -1, -1)
    v = eye[case.P: case.P + case.S].expand(case.B, case.Hkv, -1, -1)
    return q, k, v, pk, pv


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_dropout_keeps_each_probability_or_zeroes_it(backend):
    """Every probability over the P + S columns is either dropped or scaled by 1 / (1 - p), at keep rate
    1 - p, in prefix and sequence columns alike; each call draws a fresh mask."""
    case = Case(B=4, Hq=4, Hkv=2, N=16, S=24, P=24, D=64)
    args = _one_hot_values(case)
    p = 0.3
    probs = prefix_attention(*args, backend=backend)[..., : case.P + case.S]
    dropped = prefix_attention(*args, dropout_p=p, backend=backend)[..., : case.P + case.S]
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], probs[kept] / (1 - p), rtol=1e-5, atol=1e-7)
    for cols in (slice(0, case.P), slice(case.P, None)):
        rate = kept[..., cols].float().mean().item()
        assert abs(rate - (1 - p)) < 0.02, rate  # ~3.4 standard deviations for 6144 draws per segment
    again = prefix_attention(*args, dropout_p=p, backend=backend)[..., : case.P + case.S]
    assert not torch.equal(again != 0, kept)


def test_dropout_is_reproducible_from_the_seed():
    args = make_inputs(Case(B=2, Hq=2, Hkv=1, N=5, S=7, P=3, D=64), requires_grad=False).tensors
    torch.manual_seed(1234)
    first = prefix_attention(*args, dropout_p=0.5, backend="torch")
    torch.manual_seed(1234)
    assert torch.equal(prefix_attention(*args, dropout_p=0.5, backend="torch"), first)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
def test_dropout_backward_uses_the_forward_mask(shared):
    """gradcheck in float64 with the seed fixed per call: backward must regenerate the forward's mask."""
    case = Case(B=2, Hq=4, Hkv=2, N=5, S=6, P=3, D=8, shared=shared, causal=True, mask="rows", bias="heads",
                bias_grad=True)
    inp = make_inputs(case, torch.float64)
    options = {key: value for key, value in inp.options.items() if key != "attn_bias"}

    def attention(q, k, v, pk, pv, bias):
        torch.manual_seed(7)
        return prefix_attention(q, k, v, pk, pv, **options, attn_bias=bias, dropout_p=0.4, backend="torch")

    assert torch.autograd.gradcheck(attention, tuple(inp.grad_targets()), fast_mode=True)


def test_causal_mask_is_bottom_right_aligned():
    """The drawing in prefix_attention's docstring, and its N > S counterpart."""
    assert causal_visibility(2, 5, "cpu").int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert causal_visibility(3, 2, "cpu").int().tolist() == [[0, 0], [1, 0], [1, 1]]
