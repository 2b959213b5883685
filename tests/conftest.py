import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter, which must be chosen
# before fastprefix first imports its kernels (and with them Triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    """Fresh but reproducible random inputs in every test."""
    torch.manual_seed(0)


@pytest.fixture(params=["reference", "torch", "torch-explicit"])
def backend(request, monkeypatch):
    """A backend name for prefix_attention on CPU tensors. "torch" picks its implementation as it would in
    use (torch-flash unless dropout or a bias gradient needs torch-explicit); "torch-explicit" takes
    torch-flash out of the dispatcher, leaving the implementation non-CPU devices get."""
    from fastprefix import dispatch

    name, _, only = request.param.partition("-")
    if only:
        kept = tuple(i for i in dispatch.IMPLEMENTATIONS if i.backend != name or i.name == request.param)
        monkeypatch.setattr(dispatch, "IMPLEMENTATIONS", kept)
    return name
