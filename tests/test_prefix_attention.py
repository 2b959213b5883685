"""prefix_attention on every CPU backend against the float64 oracle over the concatenated keys."""

import pytest
import torch

from fastprefix import prefix_attention
from fastprefix import torch_path
from fastprefix.segment_attention import Explicit
from fastprefix.testing import Case, make_inputs, oracle, relative_error

SHAPES = [  # B, Hq, Hkv, N, S, P, D
    (1, 2, 2, 1, 1, 1, 64),      # one query, one key
    (2, 4, 4, 17, 17, 7, 64),    # MHA, square
    (2, 4, 2, 5, 33, 0, 80),     # GQA, no prefix, more keys than queries
    (3, 6, 1, 13, 13, 1, 128),   # MQA, one prefix token
    (2, 4, 2, 33, 20, 65, 64),   # more queries than keys: causal rows before N - S see only the prefix
    (1, 8, 2, 1, 50, 20, 128),   # a decoding step against a cache
    (2, 2, 1, 64, 64, 63, 80),   # block-sized sequence, prefix one short of a block
]
FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "padmask": {"mask": "rows"},
    "t5bias": {"bias": "heads"},
    "biasgrad": {"bias": "1d", "bias_grad": True},
    "all": {"causal": True, "mask": "full", "bias": "rows", "bias_grad": True},
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["reference", "torch", "torch-explicit"])
def backend(request, monkeypatch):
    """A backend name for prefix_attention. "torch" picks its segment engine as it would in use (FlashCPU
    unless dropout or a bias gradient needs Explicit); "torch-explicit" forces the Explicit engine, the
    one non-CPU devices get."""
    name, _, engine = request.param.partition("-")
    if engine:
        monkeypatch.setattr(torch_path, "_engine", lambda *args: Explicit)
    return name


TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def assert_close(actual, expected, same_precision, what, ratio):
    """Relative error below the dtype's tolerance (DESIGN.md section 6), or at most `ratio` x the error of
    the reference math run in the input dtype (`same_precision`): some quantities, like the gradient of a
    bias that cancels across a softmax row, are ill-conditioned in any implementation."""
    err = relative_error(actual, expected)
    bound = max(TOLERANCE[actual.dtype], ratio * relative_error(same_precision, expected))
    assert err <= bound, f"{what}: relative error {err:.2e} > bound {bound:.2e}"


def check_against_oracle(inp, backend, dtype):
    out, lse = prefix_attention(*inp.tensors, **inp.options, return_lse=True, backend=backend)
    assert out.dtype == dtype and out.shape == inp.tensors[0].shape
    assert lse.dtype == torch.float32 and lse.shape == out.shape[:-1]
    ref_out, ref_lse, leaves = oracle(inp)
    dout = torch.randn_like(ref_out)
    grads = torch.autograd.grad(out, inp.grad_targets(), dout.to(dtype))
    ref_grads = torch.autograd.grad(ref_out, leaves, dout)
    same_out, same_lse, same_leaves = oracle(inp, dtype=dtype)
    same_grads = torch.autograd.grad(same_out, same_leaves, dout.to(dtype))

    assert_close(out, ref_out, same_out, "out", ratio=2)
    names = ["dq", "dk", "dv", "dprefix_k", "dprefix_v", "dattn_bias"]
    for name, g, rg, sg in zip(names, grads, ref_grads, same_grads):
        assert g.shape == rg.shape and g.dtype == dtype
        assert_close(g, rg, sg, name, ratio=3)
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert_close(lse[~empty], ref_lse[~empty], same_lse[~empty], "lse", ratio=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}x{}-N{}-S{}-P{}-D{}".format(*s))
def test_matches_oracle(backend, shape, feature, shared, dtype):
    inp = make_inputs(Case(*shape, shared=shared, **FEATURES[feature]), dtype)
    check_against_oracle(inp, backend, dtype)
