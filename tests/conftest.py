import os

import pytest
import torch

from fastprefix.presets import CACHE_ENV_VAR
from helpers.backends import select_backend

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter, which must be chosen
# before fastprefix first imports its kernels (and with them Triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _temporary_weights_cache(tmp_path_factory):
    """SmolLM2's converted weights (about 0.5 GB, `fastprefix.presets.cache_dir()`) go to a temporary directory
    shared by this session's tests (and the commands they run), not to ~/.cache/fastprefix; converting them
    takes about 20 s on 2 quiet cores (a minute or more on a busy machine), once per session. To reuse a
    directory across sessions, set FASTPREFIX_CACHE to it before running pytest: then it is left as set."""
    if os.environ.get(CACHE_ENV_VAR):
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV_VAR, str(tmp_path_factory.mktemp("fastprefix-cache")))
        yield


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
