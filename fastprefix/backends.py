"""Which backend runs a call: names, availability with reasons, and the `auto` rule.

`auto` takes `FASTPREFIX_BACKEND` when set, else Triton for CUDA tensors when it is usable, else the fused
PyTorch path. An explicitly requested backend never falls back: if it cannot run, the error says why.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "torch", "reference")
ENV_VAR = "FASTPREFIX_BACKEND"


def unavailable_reasons(name: str, device: torch.device) -> list[str]:
    """Why backend `name` cannot run on `device` here; empty when it can."""
    if name == "triton":
        return ["the Triton kernels are not implemented yet; use backend='torch'"]
    return []


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that runs a call on `device` for the requested `backend` name."""
    requested = backend
    if backend == "auto":
        requested = os.environ.get(ENV_VAR, "auto")
        if requested not in BACKENDS + ("auto",):
            raise ValueError(
                f"prefix_attention: environment variable {ENV_VAR}={requested!r} is not a backend; "
                f"expected one of {', '.join(BACKENDS)} (or unset it)."
            )
    elif backend not in BACKENDS:
        raise ValueError(
            f"prefix_attention: unknown backend {backend!r}; expected one of 'auto', "
            + ", ".join(repr(b) for b in BACKENDS) + "."
        )
    if requested == "auto":
        return "triton" if device.type == "cuda" and not unavailable_reasons("triton", device) else "torch"
    reasons = unavailable_reasons(requested, device)
    if reasons:
        error = NotImplementedError if requested == "triton" else RuntimeError
        raise error(f"prefix_attention: backend {requested!r} cannot run on {device}: " + "; ".join(reasons) + ".")
    return requested
