"""Which backend runs a call: names, availability with reasons, and the `auto` rule.

`auto` takes `FASTPREFIX_BACKEND` when set, else Triton for CUDA tensors when it is usable and takes the
inputs (dtype, head dim), else the fused PyTorch path. An explicitly requested backend never falls back: if
it cannot run, the error says why.

Triton runs on CUDA tensors, and on CPU tensors through Triton's interpreter when TRITON_INTERPRET=1 was
set before fastprefix first loaded its kernels (`fastprefix.kernels`, imported on the first Triton call).
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("triton", "torch", "reference")
ENV_VAR = "FASTPREFIX_BACKEND"


def unavailable_reasons(name: str, device: torch.device) -> list[str]:
    """Why backend `name` cannot run on `device` here; empty when it can."""
    if name == "triton":
        return _triton_reasons(device)
    return []


def _triton_reasons(device: torch.device) -> list[str]:
    if importlib.util.find_spec("triton") is None:
        return ["Triton is not installed (`pip install triton`, Linux only); use backend='torch'"]
    if device.type == "cuda":
        return []
    if device.type == "cpu":
        from fastprefix import kernels

        if kernels.INTERPRETED:
            return []
        return ["the Triton kernels run on CPU tensors only through Triton's interpreter: set the environment "
                "variable TRITON_INTERPRET=1 before the first Triton call of the process (it is read when "
                "fastprefix.kernels is first imported), or use backend='torch'"]
    return [f"the Triton kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not on "
            f"{device.type}; use backend='torch'"]


def resolve_backend(backend: str, device: torch.device, triton_input_reasons: list[str] = ()) -> str:
    """The backend that runs a call on `device` for the requested `backend` name. `auto` skips Triton when
    `triton_input_reasons` (limits of the kernels for these inputs) is not empty."""
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
        usable = device.type == "cuda" and not triton_input_reasons and not unavailable_reasons("triton", device)
        return "triton" if usable else "torch"
    reasons = unavailable_reasons(requested, device)
    if reasons:
        raise RuntimeError(
            f"prefix_attention: backend {requested!r} cannot run on {device}: " + "; ".join(reasons) + ".")
    return requested
