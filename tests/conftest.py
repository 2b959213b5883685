import os

import pytest
import torch

from helpers.backends import select_backend

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter, which must be chosen
# before fastprefix first imports its kernels (and with them Triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    """Fresh but reproducible random inputs in every test."""
    torch.manual_seed(0)


@pytest.fixture(params=["torch", "torch-explicit"])
def backend(request, monkeypatch):
    """Each fused CPU implementation, for grids against the oracle (the oracle itself is not among them)."""
    return select_backend(request.param, monkeypatch)


@pytest.fixture(params=["reference", "torch", "torch-explicit"])
def any_backend(request, monkeypatch):
    """The oracle too, for behaviours checked against independent expectations (zeros, -inf, a softmax)."""
    return select_backend(request.param, monkeypatch)
