"""Every launch config the kernels can take on a GPU, run through Triton's interpreter (which otherwise uses
16 x 16 tiles): each candidate of the forward, dQ and dK/dV kernels, the dBias launches and the decode
launches, at sizes that need several of its tiles, with a causal mask, a padding mask, a bias and its gradient
against the float64 oracle, and with dropout, whose mask must be the same in forward and backward."""

import pytest
import torch

from fastprefix import kernels
from fastprefix.kernels import backward, decode, forward, tuning
from fastprefix.testing import (Case, compare_forward_to_oracle, compare_to_oracle, dropout_probabilities,
                                make_inputs)
from helpers.interpreter import device, poison_launchers

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not kernels.INTERPRETED and not torch.cuda.is_available(),
                                 reason="needs a GPU or TRITON_INTERPRET=1 before Triton is imported")]

AUTOTUNED = {"fwd": forward._fwd, "dq": backward._dq, "dkdv": backward._dkdv}
TUNED_LAUNCHES = [(name, config) for name, t in tuning.TUNED.items() for config in t.candidates]


def _launch_id(config):
    return f"{config.block_m}x{config.block_n}-{config.num_warps}w-{config.num_stages}s"


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    poison_launchers(monkeypatch)


def _failures(comparisons):
    return [str(c) for c in comparisons if not c.ok]


@pytest.mark.parametrize("kernel, config", TUNED_LAUNCHES, ids=[f"{n}-{_launch_id(c)}" for n, c in TUNED_LAUNCHES])
def test_every_autotune_candidate(kernel, config, monkeypatch):
    monkeypatch.setattr(AUTOTUNED[kernel], "configs", [config.triton_config()])
    case = Case(B=2, Hq=2, Hkv=1, N=150, S=140, P=70, D=32, causal=True, mask="rows", bias="heads", bias_grad=True)
    assert _failures(compare_to_oracle(make_inputs(case, device=device()), "triton")) == []
    # dropout: two query tiles of 128 rows, 220 key columns (one-hot values need D >= P + S)
    in_forward, in_backward, kept = dropout_probabilities(B=1, Hq=1, Hkv=1, N=130, S=150, P=70, D=256,
                                                          dropout_p=0.3, device=device())
    assert kept.any() and not kept.all() and torch.equal(kept, in_backward != 0)
    torch.testing.assert_close(in_backward, in_forward, rtol=1e-5, atol=0)


@pytest.mark.parametrize("config", list(tuning.DBIAS.candidates), ids=_launch_id)
def test_every_dbias_launch(config, monkeypatch):
    monkeypatch.setattr(backward, "fixed_launch", lambda *args, **kwargs: config)
    for bias in ("full", "heads", "1d"):  # a program per bias row block; per broadcast row; summed columns
        case = Case(B=2, Hq=2, Hkv=1, N=80, S=70, P=40, D=32, causal=True, mask="rows", bias=bias, bias_grad=True)
        assert _failures(compare_to_oracle(make_inputs(case, device=device()), "triton")) == [], bias


@pytest.mark.parametrize("config", list(tuning.DECODE.candidates), ids=_launch_id)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_row"])
def test_every_decode_launch(config, shared, monkeypatch):
    """B * G * N = 80 stacked queries: two 64-row tiles of the stacked-prefix kernel; 150 prefix keys and 100
    cached keys: several 64-key blocks."""
    monkeypatch.setattr(decode, "fixed_launch", lambda *args, **kwargs: config)
    case = Case(B=40, Hq=2, Hkv=1, N=1, S=100, P=150, D=32, shared=shared, causal=True, mask="rows", bias="heads")
    inp = make_inputs(case, device=device(), requires_grad=False)
    assert _failures(compare_forward_to_oracle(inp, "triton")) == []
