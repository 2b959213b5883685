"""Which implementation runs a `prefix_attention` call, and why the others do not (in the manner of xformers'
fmha dispatch).

`backend=` names one of BACKENDS. A backend is one or more implementations, each declaring what it supports
(devices, dtypes, head dims, queries per row, gradients, dropout, a bias gradient) and answering
`not_supported_reasons(call)`. `auto` walks AUTO_PRIORITY and runs the first implementation with no reason;
the environment variable FASTPREFIX_BACKEND, when set, replaces `auto` by the backend it names. A backend
named explicitly never falls back to another: when none of its implementations takes the call, the error
says why each does not. At DEBUG level (logger "fastprefix") every call logs which implementation ran and
why those before it were passed over; `fastprefix info` prints every implementation's limits.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .bank_attention import torch_bank_attention
from .checks import Dims
from .reference import reference_attention
from .segment_attention import Explicit, FlashCPU
from .torch_path import torch_prefix_attention
from .triton_path import (triton_bank_attention, triton_bank_decode, triton_decode_attention,
                          triton_prefix_attention)

logger = logging.getLogger("fastprefix")

BACKENDS = ("triton", "torch", "reference")
ENV_VAR = "FASTPREFIX_BACKEND"
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_HEAD_DIM = 256
DECODE_MAX_N = 16
"""Most queries per row the decode kernels get. The general forward gives each (row, query head) its own
program with a query tile of at least 16 rows, so below 16 queries its tiles are mostly empty and every program
reloads the prefix and the row's keys; from 16 queries on its tiles fill and the prefill-style grid has enough
programs. 16 covers decoding (N = 1) and speculative steps with a few draft tokens."""
DECODE_MAX_HEAD_DIM = 128
"""Largest head dim the decode kernels get: their launch configs are verified spill-free by the compile report
at D = 64 and 128 only."""
CUDA_GRID_YZ = 65535
"""Most programs a CUDA grid takes on its y and z axes, where the Triton kernels put query heads and rows."""
TRITON_MIN_ARCH = 80
"""The Triton kernels use bf16 and tf32 tensor cores and asynchronous copies: Ampere (sm_80) and newer."""


@dataclass(frozen=True)
class Call:
    """What dispatch looks at in a validated call. `needs_grad`: grad mode is on and some input requires
    grad; `bias_grad`: grad mode is on and attn_bias requires grad; `features`: "mask", "bias" and "dropout"
    where the call has them, "bank" for a prefix bank read by row index."""

    dims: Dims
    dtype: torch.dtype
    device: torch.device
    dropout_p: float
    needs_grad: bool
    bias_grad: bool
    features: frozenset = frozenset()

    @classmethod
    def of(cls, q, k, v, prefix_k, prefix_v, attn_mask, attn_bias, dims: Dims, dropout_p: float) -> Call:
        grad = torch.is_grad_enabled()
        inputs = (q, k, v, prefix_k, prefix_v, attn_bias)
        features = frozenset(name for name, present in (("mask", attn_mask is not None),
                                                          ("bias", attn_bias is not None), ("dropout", dropout_p > 0))
                             if present)
        return cls(dims, q.dtype, q.device, dropout_p,
                   needs_grad=grad and any(t is not None and t.requires_grad for t in inputs),
                   bias_grad=grad and attn_bias is not None and attn_bias.requires_grad, features=features)

    def __str__(self) -> str:
        d = self.dims
        return (f"B={d.B} Hq={d.Hq} Hkv={d.Hkv} N={d.N} S={d.S} P={d.P} D={d.D} "
                f"{'shared' if d.shared else 'per-row'} prefix, {self.dtype}, {self.device}, dropout_p={self.dropout_p}"
                f"{', gradients' if self.needs_grad else ''}{', bias gradient' if self.bias_grad else ''}")


def _anywhere(device: torch.device) -> list[str]:
    return []


def _cpu_only(device: torch.device) -> list[str]:
    if device.type == "cpu":
        return []
    return [f"PyTorch's CPU flash-attention kernels take CPU tensors, not {device.type}"]


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_environment(device: torch.device) -> list[str]:
    if not _triton_installed():
        return ["Triton is not installed (`pip install triton`, Linux only); use backend='torch'"]
    if device.type == "cuda":
        return _gpu_reasons(device)
    if device.type == "cpu":
        from fastprefix import kernels

        if kernels.INTERPRETED:
            return []
        return ["the Triton kernels run on CPU tensors only through Triton's interpreter: set the environment "
                "variable TRITON_INTERPRET=1 before the first Triton call of the process (it is read when "
                "fastprefix.kernels is first imported), or use backend='torch'"]
    return [f"the Triton kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), not on "
            f"{device.type}; use backend='torch'"]


def _gpu_reasons(device: torch.device) -> list[str]:
    """Why the Triton kernels cannot run on this CUDA device: a ROCm (HIP) GPU, or one older than sm_80."""
    if torch.version.hip is not None:
        return ["the Triton kernels are tuned and verified for NVIDIA GPUs only, and this PyTorch runs on ROCm "
                "(HIP); use backend='torch'"]
    major, minor = torch.cuda.get_device_capability(device)
    if 10 * major + minor < TRITON_MIN_ARCH:
        return [f"the Triton kernels need compute capability 8.0 or newer (Ampere: bf16 and tf32 tensor cores); "
                f"{device} is {major}.{minor}; use backend='torch'"]
    return []


def _launch_reasons(decode: bool) -> Callable[[Call], list[str]]:
    """Why the Triton kernels of a call cannot be launched: rows or heads beyond CUDA's grid limits, or, on a
    GPU, no launch config of a kernel the call runs that fits it (`kernels.tuning.Gate`)."""

    def reasons(call: Call) -> list[str]:
        found = [f"{what} = {size} is more than the {CUDA_GRID_YZ} CUDA's grid takes on the axis the Triton "
                 f"kernels put it on" for what, size in (("B", call.dims.B), ("Hq", call.dims.Hq))
                 if size > CUDA_GRID_YZ]
        if call.device.type == "cuda":
            found += _unlaunchable(call.device, max(16, 1 << (call.dims.D - 1).bit_length()), call.dtype.itemsize,
                                   call.features, decode, call.needs_grad, call.bias_grad)
        return found

    return reasons


@functools.lru_cache(maxsize=256)
def _unlaunchable(device, block_d, itemsize, features, decode, needs_grad, bias_grad) -> tuple[str, ...]:
    from fastprefix.kernels import tuning

    kernels = [tuning.DECODE] if decode else [tuning.FWD]
    if needs_grad:
        kernels += [tuning.DQ, tuning.DKDV] + [tuning.DBIAS] * bias_grad
    return tuple(tuning.unlaunchable(kernels, tuning.Gate.on(device, block_d, itemsize, features)))


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


@dataclass(frozen=True)
class Implementation:
    """One way to compute `prefix_attention`, with what it supports. `run(q, k, v, prefix_k, prefix_v, dims,
    *, causal, scale, attn_mask, attn_bias, dropout_p) -> (out, lse)` takes validated inputs.
    `environment(device)`: why it cannot run on tensors of that device here. `auto_devices`: the device
    types on which `auto` may pick it (None: any)."""

    name: str
    backend: str
    run: Callable
    devices: str
    environment: Callable[[torch.device], list[str]] = _anywhere
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    max_head_dim: int | None = None
    max_queries: int | None = None
    gradients: bool = True
    dropout: bool = True
    bias_grad: bool = True
    auto_devices: tuple[str, ...] | None = None
    fix: str = ""
    launch: Callable[[Call], list[str]] = lambda call: []

    def input_reasons(self, call: Call) -> list[str]:
        """Why this implementation cannot take these inputs; empty when it can."""
        d, reasons = call.dims, []
        if call.dtype not in self.dtypes:
            reasons.append(f"`q` must be {_dtype_names(self.dtypes)} for {self.name}, got {call.dtype}{self.fix}")
        if self.max_head_dim is not None and d.D > self.max_head_dim:
            reasons.append(f"`q` has head dim D = {d.D}, {self.name} takes D <= {self.max_head_dim}{self.fix}")
        if self.max_queries is not None and d.N > self.max_queries:
            reasons.append(f"N = {d.N} queries per row, {self.name} takes N <= {self.max_queries}")
        if call.needs_grad and not self.gradients:
            reasons.append(f"gradients are needed and {self.name} is forward-only")
        if call.dropout_p > 0 and not self.dropout:
            reasons.append(f"dropout_p = {call.dropout_p}, {self.name} has no dropout")
        if call.bias_grad and not self.bias_grad:
            reasons.append(f"attn_bias requires a gradient, which {self.name} does not compute")
        return reasons

    def not_supported_reasons(self, call: Call) -> list[str]:
        """Why this implementation cannot run the call here; empty when it can."""
        reasons = self.environment(call.device) + self.input_reasons(call)
        return reasons or self.launch(call)

    def limits(self) -> str:
        """What it takes, in one line (for `fastprefix info`)."""
        parts = [self.devices, _dtype_names(self.dtypes)]
        if self.max_head_dim is not None:
            parts.append(f"head dim <= {self.max_head_dim}")
        if self.max_queries is not None:
            parts.append(f"<= {self.max_queries} queries per row")
        missing = [what for what, has in (("gradients", self.gradients), ("dropout", self.dropout),
                                          ("bias gradient", self.bias_grad)) if not has]
        parts.append("no " + ", no ".join(missing) if missing else "gradients, dropout, bias gradient")
        return "; ".join(parts)


def _torch_engine(engine):
    return lambda *args, **options: torch_prefix_attention(*args, engine=engine, **options)


def _reference(q, k, v, prefix_k, prefix_v, dims: Dims, **options):
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out, lse = reference_attention(q, k, v, prefix_k, prefix_v, compute_dtype=compute_dtype, **options)
    return out.to(q.dtype), lse


TRITON_DEVICES = "CUDA tensors (CPU tensors under TRITON_INTERPRET=1)"
IMPLEMENTATIONS = (
    Implementation("triton-decode", "triton", triton_decode_attention, TRITON_DEVICES, _triton_environment,
                   TRITON_DTYPES, DECODE_MAX_HEAD_DIM, DECODE_MAX_N, gradients=False, dropout=False, bias_grad=False,
                   auto_devices=("cuda",), launch=_launch_reasons(decode=True)),
    Implementation("triton", "triton", triton_prefix_attention, TRITON_DEVICES, _triton_environment, TRITON_DTYPES,
                   TRITON_MAX_HEAD_DIM, auto_devices=("cuda",), fix="; use backend='torch'",
                   launch=_launch_reasons(decode=False)),
    Implementation("torch-flash", "torch", _torch_engine(FlashCPU), "CPU tensors", _cpu_only, dropout=False,
                   bias_grad=False),
    Implementation("torch-explicit", "torch", _torch_engine(Explicit), "tensors of any device"),
    Implementation("reference", "reference", _reference, "tensors of any device (float32 oracle; materializes)"),
)
AUTO_PRIORITY = ("triton-decode", "triton", "torch-flash", "torch-explicit")


def implementations(backend: str | None = None) -> list[Implementation]:
    """The implementations of `backend` in priority order (every one when None)."""
    return [impl for impl in IMPLEMENTATIONS if backend is None or impl.backend == backend]


def unavailable_reasons(backend: str, device: torch.device) -> list[str]:
    """Why no implementation of `backend` can run on tensors of `device` here; empty when one can."""
    found = [impl.environment(device) for impl in implementations(backend)]
    if any(not reasons for reasons in found):
        return []
    return list(dict.fromkeys(reason for reasons in found for reason in reasons))


def _require_known(backend: str, where: str) -> None:
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {backend!r}; expected one of 'auto', "
                         + ", ".join(repr(b) for b in BACKENDS) + ".")


def check_backend(backend, device: torch.device, where: str) -> None:
    """Refuse, before anything runs, a `backend=` that names no backend, or names one that cannot run on tensors
    of `device` here (`where`: the call, for the message). "auto" always passes."""
    if not isinstance(backend, str):
        raise TypeError(f"{where}: `backend` must be a str, got {type(backend).__name__}.")
    _require_known(backend, where)
    reasons = [] if backend == "auto" else unavailable_reasons(backend, device)
    if reasons:
        raise RuntimeError(f"{where}: backend {backend!r} cannot run on {device}: " + "; ".join(reasons) + ".")


def _requested(backend: str) -> str:
    if backend == "auto":
        requested = os.environ.get(ENV_VAR, "auto")
        if requested not in BACKENDS + ("auto",):
            raise ValueError(
                f"prefix_attention: environment variable {ENV_VAR}={requested!r} is not a backend; "
                f"expected one of {', '.join(BACKENDS)} (or unset it)."
            )
        return requested
    _require_known(backend, "prefix_attention")
    return backend


def select(backend: str, call: Call) -> Implementation:
    """The implementation that runs `call` for the requested `backend` ("auto" or one of BACKENDS)."""
    requested = _requested(backend)
    auto = requested == "auto"
    candidates = ([impl for name in AUTO_PRIORITY for impl in IMPLEMENTATIONS if impl.name == name] if auto
                  else implementations(requested))
    passed = []
    for impl in candidates:
        if auto and impl.auto_devices is not None and call.device.type not in impl.auto_devices:
            reasons = [f"auto picks {impl.name} for {', '.join(impl.auto_devices)} tensors only; "
                       f"backend='{impl.backend}' asks for it on {call.device.type}"]
        else:
            reasons = impl.not_supported_reasons(call)
        if not reasons:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("prefix_attention: %s ran (%s)%s", impl.name, call,
                             "".join(f"; passed over {i.name}: {'; '.join(r)}" for i, r in passed))
            return impl
        passed.append((impl, reasons))
    unavailable = unavailable_reasons(requested, call.device)
    if unavailable:
        raise RuntimeError(f"prefix_attention: backend {requested!r} cannot run on {call.device}: "
                           + "; ".join(unavailable) + ".")
    raise ValueError(f"prefix_attention: backend {requested!r} cannot take these inputs: "
                     + " ".join(f"({impl.name}: {'; '.join(reasons)})" for impl, reasons in passed) + ".")


BANK_BACKENDS = ("triton", "torch")
"""The backends that read a prefix bank by row index (`bank_prefix_attention`); `auto` picks as for a call with one
shared prefix (Triton for CUDA tensors where a launch fits, the torch path elsewhere)."""
_BANK_RUNS = {"triton-decode": triton_bank_decode, "triton": triton_bank_attention}


def select_bank(backend: str, call: Call) -> Callable:
    """What runs a bank call: the bank variant of the implementation `select` picks for `call` (the call with one
    entry as a shared prefix; `needs_grad` counting every entry): the Triton decode or general kernels, else the
    torch path. Takes its arguments and returns as `torch_bank_attention`."""
    return _BANK_RUNS.get(select(backend, call).name, torch_bank_attention)


def _check_reads(backend, where: str, environment: bool, supported: tuple[str, ...], refusal: str) -> None:
    """Refuse a `backend=` not among `supported` with `refusal` (what it does not read, and what to use). With
    `environment`, "auto" is first replaced by FASTPREFIX_BACKEND when that is set (as a call does; `patch`
    checks the argument alone)."""
    if not isinstance(backend, str):
        raise TypeError(f"{where}: `backend` must be a str, got {type(backend).__name__}.")
    requested = _requested(backend) if environment else backend
    _require_known(requested, where)
    if requested != "auto" and requested not in supported:
        source = f" (from {ENV_VAR})" if requested != backend else ""
        raise ValueError(f"{where}: backend {requested!r}{source} {refusal}")


def check_bank_backend(backend, where: str, *, environment: bool = True) -> None:
    """Refuse a `backend=` that cannot read a prefix bank by row index (see `_check_reads`)."""
    _check_reads(backend, where, environment, BANK_BACKENDS,
                 "does not read a prefix bank by row index (it takes one prefix); use backend='triton' or 'torch' "
                 "(or 'auto', which picks between them as for one prefix).")


LEVELS_BACKENDS = ("torch",)
"""The backends that read levels of prefixes (`levels_prefix_attention`); `auto` picks the torch path for levels
on any device."""


def check_levels_backend(backend, where: str, *, environment: bool = True) -> None:
    """Refuse a `backend=` that cannot read levels of prefixes (cascade prompts; see `_check_reads`)."""
    _check_reads(backend, where, environment, LEVELS_BACKENDS,
                 "does not read levels of prefixes: the Triton kernels do not read levels yet (and 'reference' "
                 "takes one prefix); use backend='torch' (or 'auto', which picks it for levels on any device).")
