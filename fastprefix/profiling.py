"""Peak memory of a call on the CPU, for benchmarks (CUDA has torch.cuda.max_memory_allocated)."""

from __future__ import annotations

import contextlib
import os
import sys

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def peak_cpu_memory(fn) -> int:
    """Bytes: the peak, during `fn()`, of CPU memory allocated by the call and not yet freed. Tensors that
    existed before the call (inputs, parameters) are not counted, nor are their frees; kernels' internal
    buffers are.

    Reads the allocation events the profiler records with `profile_memory=True` (address and size of every
    allocation and free of the CPU allocator), in time order. Without shapes or stacks the profiler costs
    little (about 1.1x on a generate call); still, measure memory and time in separate runs.
    """
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():
        prof.start()
    try:
        fn()
    finally:
        with _native_stderr_silenced():
            prof.stop()
    live = peak = 0
    created = {}
    for event in _allocations(prof.profiler.kineto_results.experimental_event_tree()):
        if event.device.type != "cpu":
            continue
        if event.alloc_size > 0:
            created[event.ptr] = event.alloc_size
            live += event.alloc_size
            peak = max(peak, live)
        elif event.ptr in created:
            live -= created.pop(event.ptr)
    return peak


def _allocations(roots):
    """The allocation events (alloc_size > 0) and frees (< 0) under the profiler's event tree, in time order
    (ties keep the tree's order)."""
    found, stack = [], list(reversed(roots))
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            found.append((event.start_time_ns, len(found), event.extra_fields))
        stack.extend(reversed(event.children))
    return [fields for *_, fields in sorted(found, key=lambda item: item[:2])]


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
