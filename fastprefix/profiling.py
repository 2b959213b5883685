"""Peak memory of a call on the CPU, for benchmarks (CUDA has torch.cuda.max_memory_allocated)."""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

PROFILER_LOG_LINE = re.compile(rb"SyncActivityProfilerHandler\.cpp|Memory block of unknown size was allocated before "
                               rb"the profiling started")
"""The profiler's native log lines: one as it starts and one as it stops, and one when the call frees memory
allocated before the profiler started (which, as documented below, is not counted)."""


def peak_cpu_memory(fn) -> int:
    """Bytes: the peak, during `fn()`, of CPU memory allocated by the call and not yet freed. Tensors that
    existed before the call (inputs, parameters) are not counted, nor are their frees; kernels' internal
    buffers are.

    Reads the allocation events the profiler records with `profile_memory=True` (address and size of every
    allocation and free of the CPU allocator), in time order. Without shapes or stacks the profiler costs
    little (about 1.1x on a generate call); still, measure memory and time in separate runs.
    """
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _profiler_log_lines_dropped():
        prof.start()
        try:
            fn()
        finally:
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
def _profiler_log_lines_dropped():
    """File descriptor 2 into a temporary file within the block, then its lines back to stderr but for the
    profiler's own (PROFILER_LOG_LINE), which would break a progress bar and say nothing about the call. What
    the call itself writes to stderr is kept, and appears when the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True) if not PROFILER_LOG_LINE.search(line)]
            os.write(2, b"".join(kept))
