"""The fused path never concatenates prefix and sequence keys, nor copies a shared prefix per row."""

import pytest
import torch

from fastprefix import dispatch, prefix_attention
from fastprefix.reference import reference_attention
from fastprefix.testing import AllocationRecorder, Case, make_inputs, materialization_violations

# Sizes chosen so that P + S = 20, P = 7 and D = 16 equal no other dimension.
CASE = dict(B=3, Hq=4, Hkv=2, N=11, S=13, P=7, D=16)


def fused(q, k, v, prefix_k, prefix_v, **options):
    return prefix_attention(q, k, v, prefix_k, prefix_v, **options, backend="torch")


def run_recorded(case, attention=fused):
    """Forward and backward of `attention` on a random `case`; returns the materialization violations."""
    inp = make_inputs(case)
    with AllocationRecorder() as rec:
        out = attention(*inp.tensors, **inp.options)
        out.backward(torch.randn_like(out))
    return materialization_violations(rec.produced, B=case.B, Hq=case.Hq, Hkv=case.Hkv, N=case.N, P=case.P,
                                      S=case.S, D=case.D, itemsize=4, shared=case.shared)


@pytest.mark.parametrize("engine", ["default", "explicit"])
@pytest.mark.parametrize("options", [{}, {"causal": True, "mask": "rows", "bias": "heads", "bias_grad": True}],
                         ids=["plain", "masked"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
def test_torch_path_does_not_materialize(shared, options, engine, monkeypatch):
    if engine == "explicit":
        kept = tuple(i for i in dispatch.IMPLEMENTATIONS if i.name != "torch-flash")
        monkeypatch.setattr(dispatch, "IMPLEMENTATIONS", kept)
    assert run_recorded(Case(**CASE, shared=shared, **options)) == []


def triton(q, k, v, prefix_k, prefix_v, **options):
    return prefix_attention(q, k, v, prefix_k, prefix_v, **options, backend="triton")


@pytest.mark.parametrize("options", [{}, {"causal": True, "mask": "rows", "bias": "heads", "bias_grad": True}],
                         ids=["plain", "masked"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
def test_triton_path_does_not_materialize(shared, options, monkeypatch):
    """The launchers around the kernels copy nothing per row either. A shared prefix's gradient is summed in
    chunks of (row, head) pairs as fp32 partials: their number follows the programs the GPU needs in flight,
    not B (with a long prefix, one chunk). The test pins one chunk; at B = 3 three chunks would be as large
    as a per-row copy and trip the detector."""
    from fastprefix.kernels import common

    monkeypatch.setattr(common, "INTERPRETER_PROGRAMS", 1)
    assert run_recorded(Case(**CASE, shared=shared, **options), triton) == []


def concatenating(q, k, v, prefix_k, prefix_v, **options):
    return reference_attention(q, k, v, prefix_k, prefix_v, **options)[0]


def copying_per_row(q, k, v, prefix_k, prefix_v, **options):
    rows = (q.shape[0], -1, -1, -1)
    return fused(q, k, v, prefix_k.expand(rows).contiguous(), prefix_v.expand(rows).contiguous(), **options)


@pytest.mark.parametrize("attention, rule", [(concatenating, "key columns"), (copying_per_row, "copied per row")])
def test_detector_catches_materialization(attention, rule):
    """The check above can fail: a path that concatenates, or copies the shared prefix per row, is caught."""
    bad = run_recorded(Case(**CASE, shared=True), attention)
    assert any(rule in b for b in bad), bad


def test_position_bias_is_not_copied_per_row():
    """A T5-style bias [1, H, N, P + S] with a padding mask [B, 1, 1, S]: the sequence part of the bias is
    never combined with the mask into a [B, H, N, S] tensor (CPU flash engine, row by row)."""
    case = Case(**CASE, mask="rows", bias="heads")
    inp = make_inputs(case)
    with AllocationRecorder() as rec:
        out = fused(*inp.tensors, **inp.options)
        out.backward(torch.randn_like(out))
    per_row = [(op, shape) for op, shape, _ in rec.produced if shape == (case.B, case.Hq, case.N, case.S)]
    assert per_row == []
