"""Peak memory of a call on the CPU, for benchmarks (CUDA has torch.cuda.max_memory_allocated)."""

from __future__ import annotations

import contextlib
import os
import sys

from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action


def peak_cpu_memory(fn) -> int:
    """Bytes: the peak, during `fn()`, of CPU memory allocated by the call and not yet freed. Tensors that
    existed before the call (inputs, parameters) are not counted; kernels' internal buffers are.

    Reads the profiler's memory timeline (`torch.profiler._memory_profiler`, the machinery behind the
    deprecated `export_memory_timeline`). Slow: measure memory and time in separate runs.
    """
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True)
    with _native_stderr_silenced():
        prof.start()
    try:
        fn()
    finally:
        with _native_stderr_silenced():
            prof.stop()
    live = peak = 0
    created = set()
    for _, action, (key, _version), nbytes in prof._memory_profile().timeline:
        if key.device.type != "cpu":
            continue
        if action == Action.CREATE:
            created.add(key)
            live += nbytes
            peak = max(peak, live)
        elif action == Action.DESTROY and key in created:
            live -= nbytes
    return peak


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 to /dev/null: the profiler's C++ side logs a line to stderr on every start and stop,
    which would break a progress bar. Only around start and stop; `fn`'s own output is untouched."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
