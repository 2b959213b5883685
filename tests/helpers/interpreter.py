"""What the Triton tests share: the device they run on (a GPU, else CPU tensors through Triton's interpreter,
which tests/conftest.py selects) and NaN-poisoned launcher buffers, so an element a kernel forgets to write
shows."""

import torch


class PoisonedTorch:
    """The `torch` module as the launchers see it, with `empty` returning NaN-filled float tensors."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t


def poison_launchers(monkeypatch):
    """Every buffer the kernel launchers allocate is NaN-poisoned for the rest of the test."""
    from fastprefix.kernels import backward, decode, forward

    for module in (forward, backward, decode):
        monkeypatch.setattr(module, "torch", PoisonedTorch())


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"

